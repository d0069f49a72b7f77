"""Alert evaluation and dispatch, on the `alerts` queue. (issue 4: in progress)"""
