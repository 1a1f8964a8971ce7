"""What the tests share: the project's files and commands, generated images, one tiny
workspace builder, local servers (HTTP, Prefect), a browser, and the fault tallies."""
