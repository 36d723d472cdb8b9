"""The ingest service: CI events from outside, normalized, deduplicated, appended.

Map (pure: no I/O; I/O: talks to the log, a broker or a provider; wiring: joins the parts):

* pure — ``fields`` (typed access to untrusted JSON that names the bad field; what every
  normalizer returns), ``gitlab``, ``github``, ``buildkite``, ``taskcluster``, ``kubernetes``
  (one normalizer per source: payload -> events with idempotency keys, or why it is ignored),
  ``failure_reasons`` (providers' failure vocabularies, old and new names, to one canonical
  reason), ``reviews`` (merge/pull requests as events); webhook secrets, signatures and
  tokens are checked by ``ciretry.common.auth``;
* I/O — ``app`` (the HTTP front door: authenticate, parse, normalize, commit, answer;
  concurrent webhooks share a transaction through ``ciretry.common.groupcommit``), ``pulse``
  (Taskcluster's AMQP exchanges), ``reconcile`` (failed jobs the webhooks missed, from GitLab's API);
* wiring — ``main`` (the service process; it mounts the audit component), ``cli``
  (``ciretry ingest``).
"""
