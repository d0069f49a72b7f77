"""What operators run: the `bulwark` command and the processes of `bulwark up`.

cli          the command's parser and its error handling
status       `bulwark status` and `bulwark health`: views of one fleet snapshot
deadletters  `bulwark deadletter list|replay`
alerts       `bulwark alerts list|silence|silences|unsilence`
supervisor   `bulwark up` / `bulwark proc`: the Procfile under honcho
embedded     a private redis-server on a free loopback port
"""
