"""The child side of isolation: the zygote, the child's process setup and its session.

Imports the IPC layer and the context API only, never the supervisor.
"""
