"""`autoep plan`: simulate a training step at cluster scale, on one machine, before paying for it."""

from autoep.plan.api import LayoutPlan, PlanResult, check_layout, plan

__all__ = ["LayoutPlan", "PlanResult", "check_layout", "plan"]
