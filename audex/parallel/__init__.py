"""Scale-out: the ``parallelism:`` layout (:mod:`.config`), its dry-run planner (:mod:`.planner`) and context
parallelism over packed rows (:mod:`.context_parallel`)."""
