"""Public tools: pretrain, load_model, embed, predict_expression, score_expression, retrieve."""

from ._embed import embed
from ._predict import predict_expression
from ._pretrain import pretrain
from ._score import score_expression

__all__ = ["embed", "predict_expression", "pretrain", "score_expression"]
