"""The act service: budgets folded from the log, retry decisions, and the CI calls behind them.

Map (pure: no I/O, no clock; I/O: talks to the log or a provider; wiring: joins the parts):

* pure — ``budget`` (a chain's ``BudgetState`` folded from its events, and ``decide``: verdict +
  state + policy + now -> the decision), ``slim`` (slim decoders of the events the fold reads),
  ``policy`` (the retry policy: TOML, scopes, limits, backoff, sizes);
* I/O — ``chains`` (loads a chain's state from the event log: origin, members, cold start from
  bodies), ``handler`` (decides on a verdict and appends the decision with its expected
  versions), ``runner`` (carries out a request at the provider once and records the outcome),
  ``scheduler`` (runs the open requests that are due), ``executors`` (the GitLab, GitHub and
  Taskcluster APIs, checked before acting), ``breaker`` (a provider that just failed to answer
  is not asked again for a while), ``replay`` (rebuilds every budget from the log and
  checks every decision);
* wiring — ``service`` (``ActHandler``: the parts composed over an ``EventLog``), ``main`` (the
  service process: consumer, scheduler), ``cli`` (``ciretry replay``).
"""
