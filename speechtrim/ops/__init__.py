"""speechtrim.ops: pure tensor functions for token reduction (plans, adjacent merge, eviction); no model code."""

from speechtrim.ops.merge import (
    adjacent_similarity,
    flatten_heads,
    merge_plan,
    same_span_pairs,
)
from speechtrim.ops.plan import Plan, apply_plan, compose_plans, gather_time, identity_plan, plan_from_slots
from speechtrim.ops.select import count_to_remove, count_to_remove_int, evict_plan

__all__ = [
    "Plan",
    "adjacent_similarity",
    "apply_plan",
    "compose_plans",
    "count_to_remove",
    "count_to_remove_int",
    "evict_plan",
    "flatten_heads",
    "gather_time",
    "identity_plan",
    "merge_plan",
    "plan_from_slots",
    "same_span_pairs",
]
