"""Beat-driven health checks. (issue 4: in progress)"""
