"""agentd, the box-wide service, and its clients.

One concept per module: :mod:`.protocol` (the wire format), :mod:`.config`
(``/etc/agent/agentd.toml``), :mod:`.jobs` (jobs and their SQLite store), :mod:`.boxpool`
(the box's one admission path), :mod:`.jobcgroups` (a delegated cgroup per job),
:mod:`.spawner` (forks job runners as their users), :mod:`.runner` (a job, as its
user), :mod:`.remote` (admission by agentd, from a client), :mod:`.supervise` (jobs and
their runners, in agentd), :mod:`.server` (agentd itself), :mod:`.notify` (sd_notify),
:mod:`.ctl` (agentctl). See docs/agentd.md.
"""
