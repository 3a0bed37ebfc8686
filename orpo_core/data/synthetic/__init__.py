"""Generated preference data: tiny arithmetic / comparison tasks for the smoke model
(:mod:`.arithmetic`) and verifiable-constraint instructions (:mod:`.instructions`)."""
