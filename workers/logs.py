"""JSON logs: one object per line with task and trace ids. (issue 4: in progress)"""
