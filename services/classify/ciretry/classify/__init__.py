"""The classify service: one verdict, with its evidence, for every failed job.

Map (pure: no I/O; I/O: talks to the log or a provider; wiring: joins the parts):

* pure — ``rules`` (rule files as data, checked on load against their own examples),
  ``patterns`` (the linear-time regex dialect), ``engine`` (one pass over a log for every rule,
  on Hyperscan or RE2, in bounded memory), ``logtext`` (raw CI log bytes to the text a person
  sees), ``logsignals`` (exit status, signal and stage read from the log), ``fold``
  (``fold_verdict``: job + pods + matches + rules -> the verdict), ``classifier`` (scan, then
  fold), ``corpus`` (judging a rule set on labelled logs);
* I/O — ``logsource`` (fetches a job's log tail from its provider, within a byte budget),
  ``service`` (``ClassifyHandler``: gathers the signals, classifies, appends the verdict);
* wiring — ``main`` (the service process), ``cli`` (``ciretry classify``, ``ciretry rules``).
"""
