"""The content pipeline's stages in pipeline order: each entry makes a kind's configured stages.

attachments and TNEF -> antivirus -> milters -> footers -> DKIM (content.py says why).
"""

from __future__ import annotations

from workers.inbound.content import StageFactory
from workers.inbound.milterstage import milter_stages

STAGES: tuple[StageFactory, ...] = (milter_stages,)
