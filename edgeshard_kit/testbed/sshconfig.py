"""How OpenSSH would reach a host: `ssh -G` per hop, the directives the kit honours, ignores or refuses (docs/ssh.md).

The kit does not re-implement ssh_config: it asks `ssh -G` for the effective settings (Include, Match, Host
patterns, HostName tokens and command-line options already applied) and walks ProxyJump chains the way ssh
does (`ssh -J rest -W %h:%p last`: each jump resolved with `ssh -G` again). Where `ssh` is not installed,
paramiko's parser stands in and refuses what it cannot honour. The connection itself: access.py.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from edgeshard_kit.core.errors import KitError

SSH_PROGRAM = "ssh"   # the OpenSSH client asked for `ssh -G`; tests point it elsewhere to try the fallback
SSH_G_TIMEOUT_S = 10.0
MAX_HOPS = 8          # a ProxyJump chain longer than this is a loop

# ssh -G keys the kit applies to the connection (docs/ssh.md, "What the kit takes from ssh_config").
HONOURED = frozenset({
    "host", "hostname", "port", "user", "identityfile", "identitiesonly", "identityagent", "proxyjump",
    "proxycommand", "hostkeyalias", "stricthostkeychecking", "userknownhostsfile", "globalknownhostsfile",
    "hashknownhosts", "connecttimeout", "connectionattempts", "addressfamily", "batchmode",
    "ciphers", "macs", "kexalgorithms", "hostkeyalgorithms", "pubkeyacceptedalgorithms"})
# Keys whose value does not matter to the kit: sessions, forwarding, multiplexing, logging, auth methods
# it never uses, extra host-key sources (without them the kit is stricter, never looser).
IGNORED = frozenset({
    "forwardagent", "forwardx11", "forwardx11trusted", "forwardx11timeout", "xauthlocation", "localforward",
    "remoteforward", "dynamicforward", "clearallforwardings", "exitonforwardfailure", "gatewayports",
    "permitremoteopen", "streamlocalbindmask", "streamlocalbindunlink", "requesttty", "sessiontype", "stdinnull",
    "forkafterauthentication", "remotecommand", "localcommand", "permitlocalcommand", "escapechar",
    "enableescapecommandline", "tunnel", "tunneldevice", "sendenv", "obscurekeystroketiming", "channeltimeout",
    "tag", "controlmaster", "controlpath", "controlpersist", "loglevel", "logverbose", "syslogfacility",
    "visualhostkey", "fingerprinthash", "compression", "tcpkeepalive", "serveraliveinterval",
    "serveralivecountmax", "ipqos", "rekeylimit", "passwordauthentication", "kbdinteractiveauthentication",
    "kbdinteractivedevices", "numberofpasswordprompts", "gssapiauthentication", "gssapikeyexchange",
    "gssapidelegatecredentials", "gssapitrustdns", "gssapirenewalforcesrekey", "gssapikexalgorithms",
    "gssapiclientidentity", "gssapiserveridentity", "hostbasedauthentication", "hostbasedacceptedalgorithms",
    "enablesshkeysign", "preferredauthentications", "addkeystoagent", "casignaturealgorithms", "updatehostkeys",
    "checkhostip", "verifyhostkeydns", "canonicaldomains", "canonicalizefallbacklocal", "canonicalizemaxdots",
    "canonicalizepermittedcnames"})
# Every other key is refused when its value differs from OpenSSH's default (`ssh -G -F /dev/null`), e.g.:
WHY_REFUSED = {
    "certificatefile": "the kit authenticates with plain key files and the agent only",
    "pkcs11provider": "the kit authenticates with plain key files and the agent only",
    "securitykeyprovider": "the kit authenticates with plain key files and the agent only",
    "pubkeyauthentication": "the kit authenticates with keys only",
    "knownhostscommand": "the kit checks host keys against known_hosts files only",
    "revokedhostkeys": "the kit checks host keys against known_hosts files only",
    "nohostauthenticationforlocalhost": "the kit checks the host key of every host",
    "requiredrsasize": "paramiko does not enforce a minimum RSA size",
    "bindaddress": "the kit does not choose the local address",
    "bindinterface": "the kit does not choose the local address",
    "canonicalizehostname": "the kit connects to HostName as given and does not canonicalize it",
    "proxyusefdpass": "paramiko runs a ProxyCommand as a pipe",
    "setenv": "the kit sends no environment variables",
}
# The algorithm lists, as paramiko's disabled_algorithms categories.
_ALGORITHMS = {"ciphers": ("ciphers", "_preferred_ciphers"), "macs": ("macs", "_preferred_macs"),
               "kexalgorithms": ("kex", "_preferred_kex"), "hostkeyalgorithms": ("keys", "_preferred_keys"),
               "pubkeyacceptedalgorithms": ("pubkeys", "_preferred_pubkeys")}
_OFFERED = {cat: getattr(paramiko.Transport, attr) for cat, attr in _ALGORITHMS.values()}  # what paramiko has
# Without ssh: what paramiko's own parser can be trusted with.
FALLBACK_HONOURED = frozenset({"host", "hostname", "port", "user", "identityfile", "identitiesonly",
                               "userknownhostsfile", "globalknownhostsfile", "stricthostkeychecking",
                               "connecttimeout", "batchmode", "hashknownhosts"})
_STRICT = {"yes": "true", "no": "false", "off": "false"}   # the fallback's spellings, as ssh -G prints them
_DEFAULT_KEYS = ("id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk", "id_xmss", "id_dsa")


@dataclass(frozen=True)
class Hop:
    """One SSH connection of a path, as ssh -G resolved it; `via` is the jump host it is reached through."""

    name: str                           # the name given to ssh (alias, address, a jump spec's host)
    hostname: str                       # address actually connected to
    port: int
    user: str
    key_files: tuple[str, ...] = ()
    known_hosts: tuple[str, ...] = ()   # UserKnownHostsFile: new keys are written to the first
    global_known_hosts: tuple[str, ...] = ()
    host_key_alias: str | None = None
    strict: str = "true"                # true | ask | accept-new | false (as ssh -G prints it)
    hash_known_hosts: bool = False
    agent: bool = True                  # try the ssh-agent's keys (IdentitiesOnly / IdentityAgent none: no)
    connect_timeout: float | None = None
    connection_attempts: int = 1
    address_family: str = "any"
    proxy_command: str | None = None    # tokens expanded; run as $SHELL -c "exec ..." like ssh does
    allowed: tuple[tuple[str, tuple[str, ...]], ...] = field(default=(), repr=False)  # category -> algorithms
    via: "Hop | None" = None

    @property
    def where(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    @property
    def key_name(self) -> str:
        """The name of the host in known_hosts: HostKeyAlias, else host or [host]:port."""
        if self.host_key_alias:
            return self.host_key_alias
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def path(self) -> list["Hop"]:
        """The hops from the coordinator's side: the first jump host first, this hop last."""
        return (self.via.path() if self.via else []) + [self]

    def existing_keys(self) -> tuple[str, ...]:
        """The identity files that exist (ssh skips missing ones, e.g. most of its default ~/.ssh/id_*)."""
        return tuple(k for k in self.key_files if os.path.isfile(k))

    def disabled_algorithms(self) -> dict[str, list[str]]:
        """paramiko's disabled_algorithms: what paramiko offers and ssh's lists leave out."""
        allowed = dict(self.allowed)
        return {cat: [a for a in _OFFERED[cat] if a not in allowed[cat]] for cat in allowed}

    def describe(self) -> dict:
        """What `ssh check` shows of the hop."""
        return {"name": self.name, "where": self.where, "user": self.user, "port": self.port,
                "key_files": list(self.key_files), "keys": list(self.existing_keys()), "agent": self.agent,
                "known_hosts": list(self.known_hosts),
                "host_key_name": self.key_name, "proxy_command": self.proxy_command}


def ssh_available() -> str | None:
    """The path of the OpenSSH client used for `ssh -G`, or None."""
    return shutil.which(SSH_PROGRAM)


def percent_expand(text: str, tokens: dict[str, str], what: str) -> str:
    """OpenSSH's %-token expansion (%% is a percent); KitError naming `what` for a token the kit doesn't expand."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "%":
            out.append(text[i])
            i += 1
            continue
        tok = text[i + 1: i + 2]
        if tok == "%":
            out.append("%")
        elif tok in tokens:
            out.append(tokens[tok])
        else:
            raise KitError(f"{what}: token %{tok} is not expanded by the kit (it knows %{', %'.join(sorted(tokens))})")
        i += 2
    return "".join(out)


def _env_expand(text: str, what: str) -> str:
    def var(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise KitError(f"{what}: environment variable {m.group(1)} is not set")
        return os.environ[m.group(1)]
    return re.sub(r"\$\{(\w+)\}", var, text)


def _run_ssh_g(ssh: str, name: str, config: str | None, user: str | None, port: int | None, jump: str | None,
               known_hosts: str | None) -> tuple[dict[str, list[str]], list[str]]:
    argv = [ssh, "-G", "-vvv"]
    argv += ["-F", config] if config else []
    argv += ["-l", user] if user else []
    argv += ["-p", str(port)] if port else []
    argv += ["-J", jump] if jump else []
    argv += ["-o", f'UserKnownHostsFile="{known_hosts}"'] if known_hosts else []
    try:
        proc = subprocess.run([*argv, "--", name], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=SSH_G_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise KitError(f"host {name}: `ssh -G` did not answer within {SSH_G_TIMEOUT_S:.0f} s") from None
    debug = proc.stderr.splitlines()
    if proc.returncode != 0:
        why = [ln for ln in debug if not ln.startswith(("debug", "OpenSSH_", "Pseudo-terminal"))]
        raise KitError(f"host {name}: ssh cannot resolve it with {config or 'the default ssh config'}: "
                       f"{(why or ['ssh -G failed'])[-1].strip()}")
    settings: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        settings.setdefault(key.lower(), []).append(value.strip())
    return settings, debug


_BASELINE: dict[str, dict[str, list[str]]] = {}


def _baseline(ssh: str) -> dict[str, list[str]]:
    """OpenSSH's defaults, as `ssh -G -F /dev/null` prints them (once per process)."""
    if ssh not in _BASELINE:
        _BASELINE[ssh] = _run_ssh_g(ssh, "edgeshard-kit-defaults.invalid", "/dev/null", None, None, None, None)[0]
    return _BASELINE[ssh]


def _origin(directive: str, debug: list[str], fallback_files: list[str]) -> tuple[str, str]:
    """("FILE line N", the directive as spelled there): the first block that applied (read from ssh -vvv)."""
    files, applied, pending = [], set(), set()
    for line in debug:
        m = re.search(r"Reading configuration data (.+)$", line)
        if m:
            files.append(m.group(1).strip())
        m = re.search(r": (.+) line (\d+): (Applying options for|matched|not matched) ", line + " ")
        if m and m.group(3) == "Applying options for":
            applied.add((m.group(1), int(m.group(2))))
        elif m:
            pending.add((m.group(1), int(m.group(2))))
        if "match found" in line and "not found" not in line:
            applied |= pending
        if "match found" in line or "match not found" in line:
            pending = set()
    for path in dict.fromkeys(files or fallback_files):
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        block = None
        for n, raw in enumerate(lines, 1):
            word = re.split(r"[\s=]+", raw.strip(), maxsplit=1)[0]
            if word.lower() in ("host", "match"):
                block = n
            elif word.lower() == directive and (block is None or (path, block) in applied or not debug):
                return f"{path} line {n}", word
    return f"the ssh configuration ({', '.join(dict.fromkeys(files or fallback_files)) or 'command line'})", directive


def _refuse(name: str, values: list[str], origin: tuple[str, str], why: str) -> KitError:
    shown = "; ".join(values)[:120]
    return KitError(f"host {name}: {origin[0]}: {origin[1]} {shown} cannot be honoured by the kit's SSH ({why}); "
                    f"remove it for this host (docs/ssh.md lists what the kit honours)")


def _check_directives(name: str, cfg: dict[str, list[str]], debug: list[str], files: list[str],
                      baseline: dict[str, list[str]] | None) -> None:
    """KitError for the first key that the kit would otherwise ignore silently (see HONOURED / IGNORED)."""
    honoured = HONOURED if baseline is not None else FALLBACK_HONOURED
    for key, values in cfg.items():
        if key in honoured:
            continue
        if key in IGNORED:
            continue
        if baseline is not None and values == baseline.get(key):
            continue
        why = WHY_REFUSED.get(key, "the kit does not implement it" if baseline is not None else
                              "without OpenSSH's `ssh` the kit reads ssh_config with paramiko, which cannot "
                              "honour it: install openssh-client")
        raise _refuse(name, values, _origin(key, debug, files), why)
    agent = (cfg.get("identityagent") or ["SSH_AUTH_SOCK"])[0]
    if agent not in ("none", "SSH_AUTH_SOCK", "$SSH_AUTH_SOCK", os.environ.get("SSH_AUTH_SOCK")):
        raise _refuse(name, [agent], _origin("identityagent", debug, files),
                      "the kit uses the agent of $SSH_AUTH_SOCK or none")


def parse_jump(spec: str) -> tuple[str | None, str, int | None]:
    """One ProxyJump element: [user@]host[:port] or ssh://[user@]host[:port] -> (user, host, port)."""
    s = spec.strip()
    s = s[len("ssh://"):] if s.startswith("ssh://") else s
    user, _, hostport = s.rpartition("@")
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", hostport) or re.fullmatch(r"([^:]+)(?::(\d+))?", hostport)
    if not m:
        raise KitError(f"ProxyJump {spec!r}: not [user@]host[:port]")
    return user or None, m.group(1), int(m.group(2)) if m.group(2) else None


def _fallback_settings(name: str, config: str | None, user: str | None, port: int | None,
                       known_hosts: str | None) -> tuple[dict[str, list[str]], list[str]]:
    """ssh -G's view from paramiko's parser; Include and Match are refused (paramiko has no Include)."""
    path = os.path.expanduser(config or "~/.ssh/config")
    raw: dict = {}
    if os.path.isfile(path):
        for n, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
            word = re.split(r"[\s=]+", line.strip(), maxsplit=1)[0]
            if word.lower() in ("include", "match"):
                raise KitError(f"host {name}: {path} line {n}: {word} needs OpenSSH's `ssh -G` to be resolved "
                               f"exactly, and ssh is not installed: install openssh-client")
        raw = paramiko.SSHConfig.from_path(path).lookup(name)
    cfg = {k.lower(): (v if isinstance(v, list) else [str(v)]) for k, v in raw.items()}
    cfg.setdefault("hostname", [name])
    cfg["user"] = [user] if user else cfg.get("user", [getpass.getuser()])
    cfg["port"] = [str(port)] if port else cfg.get("port", ["22"])
    cfg.setdefault("identityfile", [f"~/.ssh/{k}" for k in _DEFAULT_KEYS])
    if known_hosts:
        cfg["userknownhostsfile"] = [known_hosts]
    cfg.setdefault("userknownhostsfile", ["~/.ssh/known_hosts ~/.ssh/known_hosts2"])
    cfg.setdefault("globalknownhostsfile", ["/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2"])
    cfg.setdefault("stricthostkeychecking", ["ask"])
    return cfg, [path]


def _tokens(cfg: dict[str, list[str]], name: str) -> dict[str, str]:
    host = socket.gethostname()
    one = {k: v[0] for k, v in cfg.items() if v}
    return {"h": one["hostname"], "p": one["port"], "r": one["user"], "n": name,
            "k": one.get("hostkeyalias", name), "d": os.path.expanduser("~"), "u": getpass.getuser(),
            "i": str(os.getuid()), "l": host, "L": host.split(".")[0]}


def _files(one: dict[str, str], key: str) -> tuple[str, ...]:
    return tuple(p for p in one.get(key, "").split() if p != "none")  # `UserKnownHostsFile none`: no file


def resolve_hop(name: str, config: str | None = None, user: str | None = None, port: int | None = None,
                key: str | None = None, known_hosts: str | None = None, jump: str | None = None,
                depth: int = 0) -> Hop:
    """The effective settings of `ssh [-F config] [-l user] [-p port] [-J jump] name`, with its jump chain.

    `key`: the only identity file (the inventory's `key:`); `known_hosts`: replaces UserKnownHostsFile on
    every hop (the kit's --known-hosts). KitError naming the host, the directive and its file otherwise.
    """
    if depth > MAX_HOPS:
        raise KitError(f"host {name}: ProxyJump chain longer than {MAX_HOPS} hops (a loop?)")
    ssh = ssh_available()
    config = os.path.abspath(os.path.expanduser(config)) if config else None  # ssh -v names files as given
    if ssh:
        cfg, debug = _run_ssh_g(ssh, name, config, user, port, jump, known_hosts)
        files, baseline = [], _baseline(ssh)
    else:
        cfg, files = _fallback_settings(name, config, user, port, known_hosts)
        debug, baseline = [], None
    _check_directives(name, cfg, debug, files, baseline)
    one = {k: v[0] for k, v in cfg.items() if v}
    tokens = _tokens(cfg, name)
    via, proxy = None, None
    pj, pc = one.get("proxyjump", "none"), one.get("proxycommand", "none")
    if pj.lower() != "none":
        *rest, last = pj.split(",")
        juser, jhost, jport = parse_jump(last)
        via = resolve_hop(jhost, config, juser, jport, None, known_hosts, ",".join(rest) or None, depth + 1)
    elif pc.lower() != "none":
        proxy = percent_expand(pc, {k: tokens[k] for k in "hknpr"}, f"host {name}: ProxyCommand")
    if key:
        keys = [os.path.expanduser(key)]
    else:
        keys = [percent_expand(_env_expand(os.path.expanduser(k), f"host {name}: IdentityFile"), tokens,
                               f"host {name}: IdentityFile") for k in cfg.get("identityfile", [])]
    agent_setting = one.get("identityagent", "SSH_AUTH_SOCK")
    timeout = one.get("connecttimeout", "none")
    strict = one.get("stricthostkeychecking", "ask").lower()
    allowed = tuple((_ALGORITHMS[k][0], tuple(cfg[k][0].split(","))) for k in _ALGORITHMS if k in cfg)
    hop = Hop(name=name, hostname=one["hostname"], port=int(one["port"]), user=one["user"],
              key_files=tuple(keys),
              known_hosts=tuple(os.path.expanduser(p) for p in _files(one, "userknownhostsfile")),
              global_known_hosts=_files(one, "globalknownhostsfile"),
              host_key_alias=one.get("hostkeyalias"), strict=_STRICT.get(strict, strict),
              hash_known_hosts=one.get("hashknownhosts", "no") == "yes",
              agent=one.get("identitiesonly", "no") != "yes" and agent_setting != "none",
              connect_timeout=None if timeout == "none" else float(timeout),
              connection_attempts=max(1, int(one.get("connectionattempts", "1"))),
              address_family=one.get("addressfamily", "any"), proxy_command=proxy, allowed=allowed, via=via)
    for key_of, (cat, _) in _ALGORITHMS.items():
        if key_of in cfg and not set(cfg[key_of][0].split(",")) & set(_OFFERED[cat]):
            raise _refuse(name, cfg[key_of], _origin(key_of, debug, files),
                          "paramiko implements none of these algorithms")
    return hop


__all__ = ["Hop", "resolve_hop", "parse_jump", "percent_expand", "ssh_available", "HONOURED", "IGNORED",
           "WHY_REFUSED", "FALLBACK_HONOURED", "MAX_HOPS"]
