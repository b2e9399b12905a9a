"""
This machine: what flows through it is the plan, applied to the host.

Addresses on the virtual interface, the hosts-file section, the stable
address and port allocations, who owns a taken port, and durable writes of
the state files.
"""
