"""edgeshard-kit: profile, plan, deploy and run Llama shards across edge devices (EdgeShard)."""

__version__ = "0.1.0"
