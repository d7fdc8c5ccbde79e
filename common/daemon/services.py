"""The registry of services: what each Preboot daemon is called and where its status is found.

For each daemon one Service entry holds
    name            the short name: config /etc/preboot/<name>.conf, status socket and pidfile
                    /run/preboot/<name>.{sock,pid} by default, "daemon" in its status reply
    display_name    the service's name as administrators see it ("Preboot TFTP Service")
    status_port     the default read-only TCP status port (StatusPort) for `zmgmcast -i HOST`
    counter_order   the counters `zmgmcast -status` shows first, in this order (the rest follow)
    counter_labels  counters shown under another name than their key (the original's names)
    gauges          counters that go up and down (what is in progress now); /metrics types
                    them gauge, every other counter counter (common.daemon.metrics)
and SERVICES lists them in the order `zmgmcast -status` shows them.

Read by the daemons (their DaemonSpec and config defaults, common.daemon.runner) and by
zmgmcast, so a name, a port or a label is written once. Data only: it imports nothing of the
project (nothing in common/ imports a daemon).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

RUN_DIR = "/run/preboot"           # status sockets and pidfiles
CONFIG_DIR = "/etc/preboot"        # config files


@dataclass(frozen=True)
class Service:
    name: str
    display_name: str
    status_port: int
    counter_order: tuple[str, ...] = ()
    counter_labels: tuple[tuple[str, str], ...] = ()
    gauges: tuple[str, ...] = ()

    @property
    def program(self) -> str:
        """The executable (and init script, systemd unit) name: preboot-<name>."""
        return f"preboot-{self.name}"

    def status_socket(self, run_dir: str = RUN_DIR) -> str:
        """The default StatusSocket."""
        return os.path.join(run_dir, f"{self.name}.sock")

    def pid_file(self, run_dir: str = RUN_DIR) -> str:
        """The default PidFile."""
        return os.path.join(run_dir, f"{self.name}.pid")

    def config_file(self, config_dir: str = CONFIG_DIR) -> str:
        """The default --config."""
        return os.path.join(config_dir, f"{self.name}.conf")

    def label(self, counter: str) -> str:
        """How a counter is shown: its label, else its key as words ("bytes_sent": "Bytes sent")."""
        for key, label in self.counter_labels:
            if key == counter:
                return label
        return counter.replace("_", " ").capitalize()


PROXYDHCPD = Service("proxydhcpd", "Preboot Proxy DHCP Service", 9967)
TFTPD = Service("tftpd", "Preboot TFTP Service", 9969, gauges=("active_transfers",))
POLICYD = Service(
    "policyd", "Preboot Policy Service", 9980,
    counter_order=("queries", "script_requests", "work_assigned", "no_work", "menus_shown",
                   "fallback_answers", "directory_errors", "bad_requests"),
    gauges=("boot_transfers_active",))
IMGSRVD = Service(
    "imgsrvd", "Preboot Imaging Service", 9998,
    counter_order=("update_requests", "images_sent", "images_received", "client_referrals",
                   "bytes_sent", "bytes_received", "active_transfers", "failures"),
    # The original's imaging statistics, under its names (DOMAIN.md, "Imaging statistics").
    counter_labels=(("update_requests", "Update Requests"), ("images_sent", "Images Sent"),
                    ("images_received", "Images Received"),
                    ("client_referrals", "Client Referrals")),
    gauges=("active_transfers",))

SERVICES: tuple[Service, ...] = (PROXYDHCPD, TFTPD, POLICYD, IMGSRVD)


def by_name(name: str) -> Service | None:
    return next((service for service in SERVICES if service.name == name), None)


def by_status_port(port: int) -> Service | None:
    return next((service for service in SERVICES if service.status_port == port), None)
