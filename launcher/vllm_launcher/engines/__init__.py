"""Engines: the process (process.py: its own process group, a Unix socket and a fresh key per
start, stopped as a group), the reaper of groups a killed server left (reaper.py), and the
supervisor owning each lane's engine (supervisor.py: start, watch, stop, timings, the
upstream pool)."""

from .process import EngineProcess, EngineStartError, engine_client, sockets_dir
from .reaper import EngineRecords, default_runtime_dir
from .supervisor import Engine, Reports, Supervisor

__all__ = ["Engine", "EngineProcess", "EngineRecords", "EngineStartError", "Reports", "Supervisor",
           "default_runtime_dir", "engine_client", "sockets_dir"]
