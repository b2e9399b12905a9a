"""
ngrokd's DNS server: our names answered from a table the daemon builds,
every other name forwarded, everything bounded.

    - L{zones}: the routing domains, never a public parent zone;
    - L{table}: the names, wildcards, zones and reverse names (a value);
    - L{answer}: what to answer one question (a pure function);
    - L{upstreams}: where to forward, never to ourselves or resolved's stub;
    - L{wire}: which packets are queries, and responses sized for UDP or TCP;
    - L{ratelimit}: each source's rate;
    - L{forward}: asking the upstreams within a bound of time;
    - L{server}: the decisions per packet, the counters;
    - L{protocols}: the UDP and TCP sockets;
    - L{service}: the Twisted service that listens.

A wing: it imports the core only.
"""
