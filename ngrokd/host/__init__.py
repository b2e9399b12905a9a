"""
This machine: what flows through it is the plan, applied to the host.

Addresses on the virtual interface, the hosts-file section, the stable
address and port allocations (persisted), and who owns a taken port.
"""
