"""Local processes of a cluster: `tandem up` (`LocalCluster`) and `tandem status`."""

from tandem.launcher.config import LocalClusterConfig
from tandem.launcher.local import ChildSummary, ClusterStartError, LocalCluster
from tandem.launcher.processes import ChildProcess, ChildStartError, StartCancelled, wait_all_ready

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
