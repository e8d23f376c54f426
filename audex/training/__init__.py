"""Multi-stage training (section 4.4, Table 3): stage freezing, optimizer/schedule, steps, resume, text gate.

* :mod:`audex.training.stages`    -- ``apply_stage`` (trainable parts, text-row gradient mask), ``load_init_weights``
* :mod:`audex.training.optim`     -- ``build_optimizer_and_scheduler`` / ``configure_optimizers`` (AdamW + cosine)
* :mod:`audex.training.steps`     -- ``training_step`` / ``validation_step`` / ``compute_loss``
* :mod:`audex.training.resumable` -- ``ResumableLoader`` + ``ExactResume``: a killed run resumes at the exact batch
* :mod:`audex.training.text_gate` -- ``TextRegressionGate`` callback and ``evaluate_tasks``
* :mod:`audex.training.run`       -- one stage from its Hydra config: model, data, trainer, fit, ``.nemo``

The losses themselves (eq. 2, MoE balancing) live in :mod:`audex.losses`.
"""
