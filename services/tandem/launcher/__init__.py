"""Local processes of a cluster: `tandem up` (`LocalCluster`) and `tandem status`."""

from tandem.launcher.config import LocalClusterConfig
from tandem.launcher.local import ClusterStartError, LocalCluster
from tandem.launcher.processes import ChildProcess
from tandem.launcher.ready import ChildStartError, StartCancelled, wait_all_ready
from tandem.launcher.state_file import ChildSummary

__all__ = [
    "ChildProcess",
    "ChildStartError",
    "ChildSummary",
    "ClusterStartError",
    "LocalCluster",
    "LocalClusterConfig",
    "StartCancelled",
    "wait_all_ready",
]
