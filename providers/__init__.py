"""The remote image generators, one module per provider, each a short class with the interface of
generators.Generator speaking its provider's wire format, and the HTTP pieces they share:

- `exchange`: the process's HTTP client, and one exchange, retried within the deadline, read with a bound;
- `answers`: what came back, and a provider's error turned into what the caller hears;
- `images`: the image read out of an answer, bounded and checked;
- `openai`, `cog` (a Cog container, or Replicate): the providers.
"""
