"""Text risk for chat messages and conversations: an ONNX model plus a safety-net lexicon.

    model = TextRiskModel.load()                      # verifies model.onnx against manifest.json
    [r] = model.classify(["我攒了很多安眠药"])           # r.tier == RiskTier.IMMINENT (safety net)
    conv = model.assess_conversation(["I keep thinking about the pills", "I bought them today"])
    safety_net_scan("I would never kill myself")      # usable without the model

See cds/nlp/README.md for the decisions and compliance/model-cards/text-risk.md for the model card.
"""

from __future__ import annotations

from cds.nlp.model import TextResult, TextRiskModel
from cds.nlp.safety_net import Hit, SafetyNetResult, safety_net_scan

__all__ = ["Hit", "SafetyNetResult", "TextResult", "TextRiskModel", "safety_net_scan"]
