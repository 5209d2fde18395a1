"""One job from config to finished run: the task body, run, fit, upstream models, resume, parallel slots."""
