"""`python -m mi.actors.scheduler SPEC_JSON`: how the supervisor starts this process."""

from mi.actors.scheduler.actor import main

main()
