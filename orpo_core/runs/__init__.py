"""Run bookkeeping with no orchestration in it: stage cache keys and stamps (:mod:`.cache`), the
run-folder lock (:mod:`.lock`), whether training resumes (:mod:`.resume`), which errors are worth a
retry (:mod:`.retry`) and which data version a retraining run would see (:mod:`.data_version`)."""
