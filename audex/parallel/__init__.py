"""Scale-out: the ``parallelism:`` layout (:mod:`.config`), its dry-run planner (:mod:`.planner`), engine ``hf``'s
TP / SP / FSDP2 (:mod:`.hf_engine`) and context parallelism over packed rows (:mod:`.context_parallel`)."""
