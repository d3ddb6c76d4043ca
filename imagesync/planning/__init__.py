"""Planning: from what each node holds, what each node pulls, from where, and what it does not.

* :mod:`~imagesync.planning.plan`: the plan's data (the plan, its routes and exclusions, the policy);
* :mod:`~imagesync.planning.holdings`: what each node holds, and tag drift;
* :mod:`~imagesync.planning.planner`: :func:`~imagesync.planning.planner.make_plan`;
* :mod:`~imagesync.planning.routes`: where each pull comes from;
* the conditions: :mod:`~imagesync.planning.platforms` (platform verdicts, per-architecture
  entries) and :mod:`~imagesync.planning.room` (the disk guard, evictions);
* :mod:`~imagesync.planning.policy`: the conditions and sources put together from the settings.

Pure logic, except the conditions' Redis memory and the platform check's registry
client (:mod:`imagesync.registry`): nothing here imports a transport, a source of a
pull or Celery.
"""
