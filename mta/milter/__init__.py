"""The milter protocol (Sendmail/Postfix content filters): sans-I/O core, asyncio client, modifications."""
