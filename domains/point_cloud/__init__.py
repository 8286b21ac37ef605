"""3D point clouds: Point-BERT (written here) with Point-PEFT for shape classification."""

from . import (
    modules,  # noqa: F401  (registers point_prior_prompt, geometry_adapter, point_peft)
    tasks,  # noqa: F401  (registers pointcloud-classify)
)
