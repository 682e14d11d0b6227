# %post of driftwatch-agent ($1: 1 install, 2 upgrade). The %systemd_post macros, spelled out:
# cargo-generate-rpm does not expand rpm macros.
systemd-tmpfiles --create /usr/lib/tmpfiles.d/driftwatch-agent.conf >/dev/null 2>&1 || :
mkdir -p -m 0755 /etc/driftwatch/agent.d
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset driftwatch-agent.service >/dev/null 2>&1 || :
fi
