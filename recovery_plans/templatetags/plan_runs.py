"""``{% plan_job_tree job as tree %}``: a plan job's run as a tree (for the job page)."""
from django import template

from recovery_plans import runs

register = template.Library()


@register.simple_tag
def plan_job_tree(job):
    run = runs.plan_job_run(job=job)
    if run is None:
        return None
    return {"run": run, "groups": runs.recovery_plan_run_tree(run=run)}
