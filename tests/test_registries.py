"""Every registry is complete and agrees with the tables that loop over it: a missing piece fails here, by name.

One registry per kind (explanation methods, evaluation metrics, concept scorers, model sources, similarity
functions, report sections). Each test below parametrizes over the registry itself, as timm's tests do over its
models, so a new entry is checked the moment it is added.
"""
from __future__ import annotations
