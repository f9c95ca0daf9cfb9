#!/usr/bin/env python3
"""aiocoap as the OSCORE (RFC 8613) peer of nidd-bridge's simulated devices in tests.

Needs `pip install 'aiocoap[oscore]==0.4.17'`. Subcommands:

  write-context DIR ...   write an aiocoap file-based security context (DIR/settings.json)
  server --dir DIR ...    serve /3/0/0 (GET) and /rd (POST: an LwM2M Register, answered 2.01
                          with Location-Path rd/1 and logged) over UDP on 127.0.0.1 (free port) with OSCORE, print
                          "ready PORT" on stdout, run until stdin closes or SIGTERM
  client --dir DIR --uri URI [--observe N] ...
                          GET URI with OSCORE and print one JSON line per response:
                          {"code": "2.05", "payload": "...", "oscore": true}; exit 1 on failure

Key material is always given from the peer's own point of view (--sender-id-hex is what this
peer sends as kid). Every file is written under --dir: `<role>-context/settings.json` (the
security context; aiocoap keeps its sequence.json and lock file beside it) and
`<role>-credentials.json` (the credentials map). In the client's map the `oscore` entry sits
directly under the URI pattern: a ":name" reference there is silently ignored by aiocoap and
the request would go out unprotected.
"""

import argparse
import asyncio
import json
import os
import signal
import sys

RESOURCE_TEXT = "nidd-bridge OSCORE peer"


def context_settings(args):
    settings = {
        "sender-id_hex": args.sender_id_hex,
        "recipient-id_hex": args.recipient_id_hex,
        "secret_hex": args.secret_hex,
        "salt_hex": args.salt_hex,
        "algorithm": args.algorithm,
        "kdf-hashfun": "sha256",
    }
    if args.id_context_hex is not None:
        settings["id-context_hex"] = args.id_context_hex
    return settings


def write_context(directory, args):
    """Writes a fresh file-based security context; any old sequence state is removed."""
    os.makedirs(directory, exist_ok=True)
    for stale in ("sequence.json", "lock"):
        try:
            os.remove(os.path.join(directory, stale))
        except FileNotFoundError:
            pass
    with open(os.path.join(directory, "settings.json"), "w") as f:
        json.dump(context_settings(args), f, indent=2)
    return os.path.abspath(directory)


def write_credentials(path, pattern, context_dir):
    with open(path, "w") as f:
        json.dump({pattern: {"oscore": {"basedir": context_dir + "/"}}}, f, indent=2)
    return path


def load_credentials(path):
    from aiocoap.credentials import CredentialsMap

    credentials = CredentialsMap()
    with open(path) as f:
        credentials.load_from_dict(json.load(f))
    return credentials


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


async def serve(args):
    import aiocoap
    import aiocoap.resource as resource
    from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

    class DeviceManufacturer(resource.Resource):
        async def render_get(self, request):
            claims = list(getattr(request.remote, "authenticated_claims", []) or [])
            log("GET /3/0/0 oscore=%s" % bool(claims))
            text = RESOURCE_TEXT if claims else "unprotected"
            return aiocoap.Message(
                code=aiocoap.CONTENT,
                payload=text.encode(),
                content_format=0,
            )

    class Registrations(resource.Resource):
        async def render_post(self, request):
            claims = list(getattr(request.remote, "authenticated_claims", []) or [])
            log("POST /rd oscore=%s query=%s" % (bool(claims), "&".join(request.opt.uri_query)))
            if not claims:
                return aiocoap.Message(code=aiocoap.UNAUTHORIZED)
            return aiocoap.Message(code=aiocoap.CREATED, location_path=["rd", "1"])

    context_dir = write_context(os.path.join(args.dir, "server-context"), args)
    credentials_path = write_credentials(
        os.path.join(args.dir, "server-credentials.json"), ":device", context_dir
    )
    credentials = load_credentials(credentials_path)

    site = resource.Site()
    site.add_resource(["3", "0", "0"], DeviceManufacturer())
    site.add_resource(["rd"], Registrations())
    site = OscoreSiteWrapper(site, credentials)
    context = await aiocoap.Context.create_server_context(
        site,
        bind=("127.0.0.1", 0),
        server_credentials=credentials,
        transports=["udp6"],
    )
    port = bound_port(context)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The test harness holds our stdin open; EOF means it is gone.
    def stdin_readable():
        if not os.read(sys.stdin.fileno(), 512):
            stop.set()

    loop.add_reader(sys.stdin.fileno(), stdin_readable)

    print("ready %d" % port, flush=True)
    await stop.wait()
    await context.shutdown()


def bound_port(context):
    for interface in context.request_interfaces:
        message_interface = getattr(
            getattr(interface, "token_interface", None), "message_interface", None
        )
        transport = getattr(message_interface, "transport", None)
        if transport is not None:
            return transport.get_extra_info("socket").getsockname()[1]
    raise RuntimeError("no UDP transport bound")


async def request(args):
    import aiocoap

    context_dir = write_context(os.path.join(args.dir, "client-context"), args)
    pattern = args.uri.split("/", 3)
    pattern = "/".join(pattern[:3]) + "/*"
    credentials_path = write_credentials(
        os.path.join(args.dir, "client-credentials.json"), pattern, context_dir
    )
    if args.bind_port:
        # Send from a fixed local port, as an LwM2M server sends from its own socket.
        from aiocoap import resource

        context = await aiocoap.Context.create_server_context(
            resource.Site(), bind=("127.0.0.1", args.bind_port), transports=["oscore", "udp6"]
        )
    else:
        context = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
    with open(credentials_path) as f:
        context.client_credentials.load_from_dict(json.load(f))

    message = aiocoap.Message(code=aiocoap.GET, uri=args.uri)
    if args.observe:
        message.opt.observe = 0
    try:
        pending = context.request(message)
        first = await asyncio.wait_for(pending.response, args.timeout)
        report(first)
        if args.observe:
            seen = 0
            async for notification in pending.observation:
                report(notification)
                seen += 1
                if seen >= args.observe:
                    pending.observation.cancel()
                    break
    except Exception as e:  # noqa: BLE001 -- any failure is the test's answer
        print(json.dumps({"error": "%s: %s" % (type(e).__name__, e)}), flush=True)
        await context.shutdown()
        return 1
    await context.shutdown()
    return 0


def report(response):
    claims = list(getattr(response.remote, "authenticated_claims", []) or [])
    code = response.code.dotted
    print(
        json.dumps(
            {
                "code": code,
                "payload": response.payload.decode("utf-8", "replace"),
                "oscore": bool(claims),
            }
        ),
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("write-context", "server", "client"):
        sub = commands.add_parser(name)
        sub.add_argument("--dir", required=True)
        sub.add_argument("--secret-hex", required=True)
        sub.add_argument("--salt-hex", default="")
        sub.add_argument("--sender-id-hex", required=True)
        sub.add_argument("--recipient-id-hex", required=True)
        sub.add_argument("--id-context-hex")
        sub.add_argument("--algorithm", default="AES-CCM-16-64-128")
        if name == "client":
            sub.add_argument("--uri", required=True)
            sub.add_argument("--observe", type=int, default=0, help="notifications to await")
            sub.add_argument("--timeout", type=float, default=10.0)
            sub.add_argument("--bind-port", type=int, default=0, help="local UDP port to send from")
    args = parser.parse_args()
    if args.command == "write-context":
        print(write_context(args.dir, args))
        return 0
    if args.command == "server":
        asyncio.run(serve(args))
        return 0
    return asyncio.run(request(args))


if __name__ == "__main__":
    sys.exit(main())
