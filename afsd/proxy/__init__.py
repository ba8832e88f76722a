"""The proxy (`afsd proxy`): the scheduling front door. Clients send `afsletpb.Afslet/Execute` here as they
would to an afslet; the proxy picks an afslet with room and relays the call to it.

Data flow of one Execute call (`execute.py` drives it):

    client start frame ──► dispatch.py: loop of attempts, each one
        targets.py (DNS name → every A/AAAA address, looked up again on every attempt)
        backends.py (GetRuntimeStatus of each address, in parallel, short timeout)
        placement.py (what fits — cpu, memory, GPU slots; too big for every afslet → INVALID_ARGUMENT;
            then --strategy: power of two choices, best-fit or local-first)
        handshake: open Execute on the chosen afslet, send start, wait for `accepted`
        refused (RESOURCE_EXHAUSTED) or unreachable ──► retry.py (exponential backoff with jitter, bounded)
    accepted ──► relay.py: client frames ──► afslet, afslet frames ──► client, one message at a time;
        cancellation goes to the afslet, an afslet dying mid-call ends the call with UNAVAILABLE

Also served: `afsd.executions.v1.Executions` (`executions.py`: `afsd ps/logs/stop` over every afslet, List
fanned out and merged, Logs and Stop routed to the afslet that has the id), `afsproxy.v1.AfsProxy`
(`service.py`) — `status.py` (Status stream: layerstores from every discovery replica, merged by
`discovery_view.py`, afslets with their runtime status, a summary) and `reconcile.py`
(ReconcileImageReplica: copy an image's layers onto more layerstores, planned by `reconcile_plan.py`);
`http.py` serves `/status` (dispatch counts here and over peer proxies, `peers.py`) and `/metrics`
(`metrics.py`). `config.py` holds the flags' values, `errors.py` the statuses calls end with.
"""
