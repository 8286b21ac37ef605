"""Video-text domain: CLIP (open_clip) + LLaMA-family LMs for retrieval and captioning
(AGAdapter, Fang et al. 2023; KAdaptation, He et al. 2023).

Importing it registers `video-text-retrieval` and `video-caption`, and the methods
special to the field: `temporal_adapter` and `clip_prompt`.
"""

from . import modules, tasks  # noqa: F401  (register the methods and the tasks)
