#!/bin/sh
# /init of the vdpasim test guest (busybox ash). It mounts the basics, loads the modules packed into
# the initramfs, runs the workloads named on the kernel command line, prints machine-readable results
# on the console and powers the machine off, so that one QEMU run is one test with a parsable outcome.
#
# Parameters come from /proc/cmdline as vdpasim.KEY=VALUE (dots in KEY-less words are kernel module
# parameters, so the kernel hands them to nobody: we read the command line ourselves).
# Output protocol, parsed by vdpasim.guest.qemu:
#   VDPASIM-RESULT <one JSON object with a "type" key>
#   VDPASIM-KMSG <a kernel message of level warning or worse>
#   VDPASIM-DONE rc=<0 when every workload passed>

export PATH=/bin:/sbin
umask 022
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
KVER=$(uname -r)

# --- parameters -----------------------------------------------------------------------------------
for word in $(cat /proc/cmdline); do
	case "$word" in
	vdpasim.*=*)
		key=${word%%=*}
		key=$(echo "${key#vdpasim.}" | tr -- '-' '_')
		case "$key" in *[!a-z0-9_]* | "") continue ;; esac
		val=${word#*=}
		eval "P_$key=\$val"
		;;
	esac
done

# param KEY DEFAULT: the value of vdpasim.KEY, or DEFAULT.
param() {
	eval "_v=\${P_$1-}"
	if [ -n "$_v" ]; then echo "$_v"; else echo "$2"; fi
}

# wparam KEY DEFAULT: a workload's own parameter: vdpasim.PREFIX_KEY, else vdpasim.KEY, else DEFAULT,
# where PREFIX is the running workload's (ping, loop, blk), so workloads sharing a boot can differ.
wparam() { param "${PREFIX}_$1" "$(param "$1" "$2")"; }

# --- output helpers -------------------------------------------------------------------------------
result() { printf 'VDPASIM-RESULT %s\n' "$1"; }

# json_str TEXT: TEXT as a JSON string literal (our values carry no control characters).
json_str() { printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' | tr '\n\t' '  ')"; }

# json_list WORD...: a JSON array of strings.
json_list() {
	_out=""
	for _w in "$@"; do _out="$_out,$(json_str "$_w")"; done
	printf '[%s]' "${_out#,}"
}

error() { result "{\"type\":\"error\",\"workload\":$(json_str "$CURRENT"),\"message\":$(json_str "$1")}"; }

now_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }

# wait_for PATH SECONDS: wait until PATH exists.
wait_for() {
	_n=$(($2 * 10))
	while [ ! -e "$1" ] && [ "$_n" -gt 0 ]; do
		usleep 100000
		_n=$((_n - 1))
	done
	[ -e "$1" ]
}

# sha_range FILE OFFSET LENGTH: the SHA-256 of LENGTH bytes of FILE from OFFSET.
sha_range() {
	dd if="$1" bs=65536 skip="$2" count="$3" iflag=skip_bytes,count_bytes 2>/dev/null | sha256sum | cut -d' ' -f1
}

zeros_sha() { dd if=/dev/zero bs=65536 count="$1" iflag=count_bytes 2>/dev/null | sha256sum | cut -d' ' -f1; }

# --- modules --------------------------------------------------------------------------------------
# /etc/vdpasim/modules lists "NAME PATH" in dependency order (written at image-build time), so
# loading everything is a plain insmod loop; a chosen subset goes through modprobe and modules.dep.
MODULES_FAILED=""
load_modules() {
	_want=$(param modules all)
	[ "$_want" = none ] && return 0
	if [ "$_want" = all ]; then
		while read -r _name _path; do
			[ -d "/sys/module/$_name" ] && continue
			insmod "/lib/modules/$KVER/$_path" || MODULES_FAILED="$MODULES_FAILED $_name"
		done </etc/vdpasim/modules
	else
		for _name in $(echo "$_want" | tr , ' '); do
			modprobe "$_name" || MODULES_FAILED="$MODULES_FAILED $_name"
		done
	fi
}

# The host root, shared read-only over virtio-9p (vdpasim.hostroot=1), is mounted at /host.
mount_hostroot() {
	[ "$(param hostroot 0)" = 1 ] || return 0
	mkdir -p /host
	mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host ||
		error "cannot mount the host root (virtio-9p tag hostroot)"
}

# --- networking -----------------------------------------------------------------------------------
IFACE=$(param iface eth0)
NET_READY=0

# net_up DEFAULT_ADDR: bring IFACE up once per boot: optional queue pairs, MTU, address, promiscuity.
# IPv6 stays off unless asked for, so the interface counters hold only the workload's own frames.
net_up() {
	[ "$NET_READY" = 1 ] && return 0
	if ! wait_for "/sys/class/net/$IFACE" 10; then
		error "no interface $IFACE"
		return 1
	fi
	[ "$(param ipv6 0)" = 1 ] || echo 1 >"/proc/sys/net/ipv6/conf/$IFACE/disable_ipv6"
	_q=$(param queues "")
	[ -n "$_q" ] && result "$(vdpasim-channels "$IFACE" "$_q")"
	_mtu=$(param mtu "")
	[ -n "$_mtu" ] && ip link set "$IFACE" mtu "$_mtu"
	ip link set "$IFACE" up || {
		error "cannot bring $IFACE up"
		return 1
	}
	_addr=$(param addr "$1")
	[ -n "$_addr" ] && ip addr add "$_addr" dev "$IFACE"
	[ "$(param promisc 0)" = 1 ] && ip link set "$IFACE" promisc on
	_n=50
	while [ "$(cat "/sys/class/net/$IFACE/carrier" 2>/dev/null)" != 1 ] && [ "$_n" -gt 0 ]; do
		usleep 100000
		_n=$((_n - 1))
	done
	NET_READY=1
}

# netstats: the interface counters (/sys/class/net/IFACE/statistics), to compare with device stats.
netstats() {
	_d=/sys/class/net/$IFACE
	_s=""
	for _f in "$_d"/statistics/*; do _s="$_s,\"${_f##*/}\":$(cat "$_f")"; done
	_rxq=$(ls -d "$_d"/queues/rx-* 2>/dev/null | wc -l)
	_txq=$(ls -d "$_d"/queues/tx-* 2>/dev/null | wc -l)
	result "{\"type\":\"netstats\",\"iface\":$(json_str "$IFACE"),\"address\":$(json_str "$(cat "$_d/address")"),\"mtu\":$(cat "$_d/mtu"),\"rx_queues\":$_rxq,\"tx_queues\":$_txq,\"carrier\":$(cat "$_d/carrier" 2>/dev/null || echo null),\"features\":$(json_str "$(cat "$_d/device/features" 2>/dev/null)"),\"stats\":{${_s#,}}}"
}

# --- workloads ------------------------------------------------------------------------------------
wl_selftest() {
	_mods=$(cut -d' ' -f1 /proc/modules | sort)
	_vduse=false
	[ -e /dev/vduse/control ] && _vduse=true
	_vdpa=false
	[ -d /sys/bus/vdpa ] && _vdpa=true
	result "{\"type\":\"selftest\",\"kernel\":$(json_str "$KVER"),\"machine\":$(json_str "$(uname -m)"),\"cpus\":$(nproc),\"mem_kb\":$(awk '/^MemTotal/ { print $2 }' /proc/meminfo),\"modules\":$(json_list $_mods),\"modules_failed\":$(json_list $MODULES_FAILED),\"vdpa_bus\":$_vdpa,\"vduse_control\":$_vduse,\"net\":$(json_list $(ls /sys/class/net)),\"block\":$(json_list $(ls /sys/block)),\"image\":$(cat /etc/vdpasim/image.json)}"
	[ -z "$MODULES_FAILED" ]
}

wl_ping() {
	net_up 10.0.2.15/24 || return 1
	_peer=$(wparam peer 10.0.2.2)
	_count=$(wparam count 5)
	_size=$(wparam size 56)
	_interval=$(wparam interval 0.2)
	_out=$(ping -c "$_count" -s "$_size" -i "$_interval" -W "$(wparam wait 5)" "$_peer" 2>&1)
	_rc=$?
	_tx=$(echo "$_out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
	_rx=$(echo "$_out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
	_loss=$(echo "$_out" | sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p')
	_rtt=$(echo "$_out" | sed -n 's|^round-trip min/avg/max = \([0-9.]*\)/\([0-9.]*\)/\([0-9.]*\) ms|{"min":\1,"avg":\2,"max":\3}|p')
	result "{\"type\":\"ping\",\"iface\":$(json_str "$IFACE"),\"peer\":$(json_str "$_peer"),\"count\":$_count,\"size\":$_size,\"transmitted\":${_tx:-0},\"received\":${_rx:-0},\"loss_pct\":${_loss:-100},\"rtt_ms\":${_rtt:-null},\"rc\":$_rc}"
	[ "$_rc" = 0 ] || echo "$_out"
	netstats
	return "$_rc"
}

wl_net_loopback() {
	net_up "" || return 1
	# vdpasim.loop_cpu=N runs the sender on CPU N: with several queue pairs the kernel picks the
	# transmit queue by CPU (XPS), so this chooses the pair the frames travel on.
	_pin=""
	_cpu=$(wparam cpu "")
	[ -n "$_cpu" ] && _pin="taskset -c $_cpu"
	_out=$($_pin vdpasim-pktloop "$IFACE" "$(wparam count 30)" "$(wparam min_len 60)" "$(wparam max_len 1514)" \
		"$(wparam seed 1)" "$(wparam timeout_ms 3000)" "$(wparam frames 1)" "$(wparam window 0)")
	_rc=$?
	result "$_out"
	netstats
	return "$_rc"
}

# blk: write a random pattern at OFFSET (SIZE bytes, 4 KiB multiples), flush, read it back past the
# page cache, then write-zeroes the third quarter and discard the fourth (vdpasim.blk_zero= and
# vdpasim.blk_discard= take OFFSET:LENGTH or "none"); the checksums let the host check its backing file.
wl_blk() {
	_dev=/dev/$(wparam dev vda)
	if ! wait_for "$_dev" 10; then
		error "no block device $_dev"
		return 1
	fi
	_name=${_dev##*/}
	_off=$(wparam offset 0)
	_len=$(wparam size 1048576)
	_q=$((_len / 4))
	_zero=$(wparam zero "$((_off + 2 * _q)):$_q")
	_discard=$(wparam discard "$((_off + 3 * _q)):$_q")
	_devsize=$(blockdev --getsize64 "$_dev")
	if [ $((_off % 4096)) != 0 ] || [ $((_len % 4096)) != 0 ] || [ $((_off + _len)) -gt "$_devsize" ]; then
		error "region $_off+$_len is not 4 KiB aligned or exceeds $_devsize bytes"
		return 1
	fi
	dd if=/dev/urandom of=/tmp/pattern bs=4096 count=$((_len / 4096)) 2>/dev/null
	_pattern=$(sha256sum /tmp/pattern | cut -d' ' -f1)
	_head=$(sha_range /tmp/pattern 0 $((_len / 2)))
	_t0=$(now_ms)
	dd if=/tmp/pattern of="$_dev" bs=65536 seek="$_off" oflag=seek_bytes conv=notrunc,fsync 2>/dev/null
	_wrc=$?
	_flush=$(vdpasim-blkop flush "$_dev")
	_t1=$(now_ms)
	blockdev --flushbufs "$_dev"
	echo 3 >/proc/sys/vm/drop_caches
	_readback=$(sha_range "$_dev" "$_off" "$_len")
	_t2=$(now_ms)
	_ok=true
	[ "$_wrc" = 0 ] && [ "$_readback" = "$_pattern" ] || _ok=false
	_ranges=""
	for _spec in "zeroout:$_zero" "discard:$_discard"; do
		_op=${_spec%%:*}
		_r=${_spec#*:}
		[ "$_r" = none ] && continue
		_roff=${_r%%:*}
		_rlen=${_r#*:}
		_res=$(vdpasim-blkop "$_op" "$_dev" "$_roff" "$_rlen")
		_rc=$?
		blockdev --flushbufs "$_dev"
		echo 3 >/proc/sys/vm/drop_caches
		_sha=$(sha_range "$_dev" "$_roff" "$_rlen")
		_is_zero=false
		[ "$_sha" = "$(zeros_sha "$_rlen")" ] && _is_zero=true
		# Discarded blocks may read back as anything; write-zeroes must read back as zeros.
		[ "$_op" = zeroout ] && { [ "$_rc" = 0 ] && [ "$_is_zero" = true ] || _ok=false; }
		_ranges="$_ranges,\"$_op\":{\"result\":$_res,\"sha256\":\"$_sha\",\"is_zero\":$_is_zero}"
	done
	_final=$(sha_range "$_dev" "$_off" "$_len")
	_qd=/sys/block/$_name/queue
	_limits="\"logical_block_size\":$(cat $_qd/logical_block_size),\"discard_max_bytes\":$(cat $_qd/discard_max_bytes),\"write_zeroes_max_bytes\":$(cat $_qd/write_zeroes_max_bytes),\"write_cache\":$(json_str "$(cat $_qd/write_cache)"),\"read_only\":$(cat /sys/block/$_name/ro)"
	set -- $(cat /sys/block/"$_name"/stat)
	_stat="\"read_ios\":$1,\"read_sectors\":$3,\"write_ios\":$5,\"write_sectors\":$7,\"discard_ios\":${12:-0},\"discard_sectors\":${14:-0},\"flush_ios\":${16:-0}"
	result "{\"type\":\"blk\",\"dev\":$(json_str "$_dev"),\"features\":$(json_str "$(cat /sys/block/"$_name"/device/features 2>/dev/null)"),\"size\":$_devsize,\"offset\":$_off,\"length\":$_len,\"write_rc\":$_wrc,\"flush\":$_flush,\"pattern_sha256\":\"$_pattern\",\"head_sha256\":\"$_head\",\"readback_sha256\":\"$_readback\",\"final_sha256\":\"$_final\",\"write_ms\":$((_t1 - _t0)),\"read_ms\":$((_t2 - _t1))${_ranges},\"queue\":{$_limits},\"stat\":{$_stat},\"ok\":$_ok}"
	[ "$_ok" = true ]
}

# script: run a shell script from the shared host root (vdpasim.script=/absolute/host/path); it
# prints its own VDPASIM-RESULT lines.
wl_script() {
	_script=$(param script "")
	if [ -z "$_script" ] || [ ! -r "/host$_script" ]; then
		error "vdpasim.script must name a readable file under the shared host root"
		return 1
	fi
	sh "/host$_script"
}

# blk-verify: O_DIRECT pattern writes and read-backs of a region, pass after pass, for vdpasim.verify_seconds
# (vdpasim-blkverify): a back-end restarted under the guest must lose, fail or corrupt no completed write.
wl_blk_verify() {
	_dev=/dev/$(wparam dev vda)
	if ! wait_for "$_dev" 10; then
		error "no block device $_dev"
		return 1
	fi
	result "$(vdpasim-blkverify "$_dev" "$(wparam offset 0)" "$(wparam size 1048576)" "$(wparam seconds 10)" \
		"$(wparam seed 1)")"
}

# pause: report, then sleep vdpasim.pause_ms (default 2000) while the host acts on the VM (QMP stop and
# cont, system_reset): the workloads around it show the device still works afterwards.
wl_pause() {
	_ms=$(wparam ms 2000)
	result "{\"type\":\"pause\",\"ms\":$_ms}"
	usleep $((_ms * 1000))
}

# --- main -----------------------------------------------------------------------------------------
load_modules
mount_hostroot
# Kernel messages would interleave with result lines on the shared console: keep them off it and
# replay warnings (and worse) at the end instead.
[ "$(param debug 0)" = 1 ] || echo 1 >/proc/sys/kernel/printk

RC=0
for CURRENT in $(param workload selftest | tr , ' '); do
	_start=$(now_ms)
	PREFIX=$(echo "$CURRENT" | sed -e 's/^net-loopback$/loop/' -e 's/^blk-verify$/verify/')
	case "$CURRENT" in
	selftest) wl_selftest ;;
	ping) wl_ping ;;
	net-loopback) wl_net_loopback ;;
	blk) wl_blk ;;
	script) wl_script ;;
	pause) wl_pause ;;
	blk-verify) wl_blk_verify ;;
	*)
		error "unknown workload"
		false
		;;
	esac
	_wrc=$?
	[ "$_wrc" = 0 ] || RC=1
	result "{\"type\":\"status\",\"workload\":$(json_str "$CURRENT"),\"rc\":$_wrc,\"ms\":$(($(now_ms) - _start))}"
done

dmesg -r | sed -n 's/^<[0-4]>/VDPASIM-KMSG /p'
echo "VDPASIM-DONE rc=$RC"
sync
poweroff -f
# Should the power-off request fail, the kernel panics (init exited) and panic=-1 + -no-reboot end QEMU.
