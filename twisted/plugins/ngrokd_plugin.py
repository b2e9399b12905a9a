"""
twistd plugins: C{twistd -n ngrokd} and C{twistd -n ngrokd-devcloud}.

Kept to lazy L{ServiceMaker} lines so that a broken import in ngrokd never hides
other plugins from C{twistd --help}.
"""

from twisted.application.service import ServiceMaker

ngrokd = ServiceMaker(
    "ngrokd",
    "ngrokd.tap",
    "Reach ngrok's Kubernetes-bound endpoints by name from this machine.",
    "ngrokd",
)

ngrokd_devcloud = ServiceMaker(
    "ngrokd-devcloud",
    "ngrokd.devcloud.tap",
    "A local stand-in for ngrok's API and binding ingress.",
    "ngrokd-devcloud",
)
