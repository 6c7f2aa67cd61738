"""stab's command line: Typer commands that parse, call stability/ and print with Rich."""
