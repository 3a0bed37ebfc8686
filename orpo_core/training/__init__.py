"""ORPO training: the loss (:mod:`.loss`, fused lm-head + loss in :mod:`.fused`), batch layouts
(:mod:`.collator`, padding-free :mod:`.packing`, shared prompts :mod:`.sharing`), the Trainer subclass
(:mod:`.trainer`), one training run (:mod:`.run`) and several processes (:mod:`.launch`)."""
