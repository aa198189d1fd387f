"""Public tools: pretrain, load_model, embed, predict_expression, score_expression, retrieve."""

from ._embed import embed
from ._load import load_model
from ._predict import predict_expression
from ._pretrain import pretrain
from ._retrieve import retrieve
from ._score import score_expression

__all__ = ["embed", "load_model", "predict_expression", "pretrain", "retrieve", "score_expression"]
