"""demogreet: the one third-party dependency of the demo's example project.

Served by the demo's own package index (an in-house mirror) and installed by the fleet's
install run, through the egress proxy, from a hash-pinned requirements.txt.
"""

VERSION = "1.0"


def greeting(name):
    """Return a greeting for name."""
    return f"Hello, {name}!"
