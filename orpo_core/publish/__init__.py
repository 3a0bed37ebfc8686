"""Publishing: the model card (:mod:`.card`, body in ``templates/model_card.md``) and the Hugging Face
Hub folder and upload (:mod:`.hub`)."""
