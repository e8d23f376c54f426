"""Multi-stage training (section 4.4, Table 3): orchestration above :class:`~audex.models.audex_model.AudexModel`.

* :mod:`audex.training.stages`    -- ``apply_stage`` (trainable parts, text-row gradient mask), ``load_init_weights``
* :mod:`audex.training.resumable` -- ``ResumableLoader`` + ``ExactResume``: a killed run resumes at the exact batch
* :mod:`audex.training.text_gate` -- ``TextRegressionGate`` callback and ``evaluate_tasks``
* :mod:`audex.training.run`       -- one stage from its Hydra config: model, data, trainer, fit, ``.nemo``

The model owns its steps (``AudexModel.training_step`` / ``validation_step`` / ``configure_optimizers``); the
losses (eq. 2), MoE balancing and the optimizer setup are stateless helpers in :mod:`audex.parts`.
"""
