"""Selection: policies that order weight matrices, budgets and quotas, exports for trainers."""
