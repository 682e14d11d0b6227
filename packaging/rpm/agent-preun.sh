# %preun of driftwatch-agent ($1: 0 erase, 1 upgrade): %systemd_preun.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now driftwatch-agent.service >/dev/null 2>&1 || :
fi
