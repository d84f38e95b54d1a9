"""`python -m mi.actors.worker SPEC_JSON`: how the supervisor starts this process."""

from mi.actors.worker.actor import main

main()
