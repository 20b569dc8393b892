package Test::LLMProxy::Nginx;

# Data-driven nginx tests in the style of Test::Nginx::Socket, on Debian's
# Test::Base (libtest-base-perl) and core Perl only. See t/README.md for the
# block sections, the variables and how the server is managed.

use strict;
use warnings;

use Test::Base;    # block parsing (=== / ---), filters, Test::More
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Copy qw(copy);
use File::Path qw(make_path remove_tree);
use File::Spec;
use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw(sleep time);

our $VERSION = '0.1.0';

my @EXPORTS = qw(
    run_tests workers add_block_preprocessor no_reload known_sections
    repo_root servroot server_port llmproxy_lib_dir llmproxy_lib nginx_binary
    blocks plan diag skip
);

sub import {
    my $caller = caller;
    no strict 'refs';
    *{"${caller}::$_"} = \&{$_} for @EXPORTS;
    return;
}

# ---------------------------------------------------------------- settings

my $Repo = abs_path(File::Spec->catdir(dirname(abs_path(__FILE__)), ('..') x 4));
my $Workers = 1;
my @Preprocessors;
# The sections a block may have: the harness's, and those helpers and test
# files read themselves (known_sections). Any other is an error, so that a
# check this harness does not implement can never pass by doing nothing.
my %Known = map { $_ => 1 } qw(
    request response_body response_body_like response_headers error_code more_headers
    error_log no_error_log config http_config main_config nginx_conf user_files
    listen_opts timeout wait diag_body skip_nginx stop_after
);
my $Reload = $ENV{TEST_NGINX_NO_RELOAD} ? 0 : 1;
my $DefaultTimeout = $ENV{TEST_NGINX_TIMEOUT} || 5;

# Where `require "llmproxy"` looks: LLMP_LIB_DIR (as examples/lua does), else
# the ffi crate's release directory.
my $LibDir = $ENV{LLMP_LIB_DIR} || "$Repo/ffi/target/release";

my $NginxBin = $ENV{TEST_NGINX_BINARY}
    || (grep { -x } map { "$_/nginx" } split(/:/, $ENV{PATH} || ''), '/usr/sbin')[0]
    || 'nginx';
my $ModDir = $ENV{TEST_NGINX_MODULES} || '/usr/lib/nginx/modules';

# The server of this test file. $CpathDir is where nginx loads
# libllmproxy.so from: a private copy in the servroot (see _prepare_servroot).
my ($Servroot, $Port, @ExtraPorts, $MasterPid, $StartedBy, $CpathDir);
my $DebugLog = 1;    # whether the running config logs at debug level

sub repo_root        { return $Repo }
sub llmproxy_lib_dir { return $LibDir }
sub llmproxy_lib     { return "$LibDir/libllmproxy.so" }
sub nginx_binary     { return $NginxBin }
sub servroot         { return $Servroot }
sub server_port      { return $Port }

# workers(N): worker_processes for every block of this file (default 1).
sub workers {
    my ($n) = @_;
    die "workers() needs a positive integer\n" unless defined $n && $n =~ /^[1-9]\d*$/;
    $Workers = $n;
    return;
}

# no_reload(): start a fresh nginx for every block instead of reloading.
sub no_reload { $Reload = 0; return }

# add_block_preprocessor(sub { my $block = shift; ... }): runs on every block
# before it is used (e.g. to give every block a common http_config).
sub add_block_preprocessor {
    my ($code) = @_;
    push @Preprocessors, $code;
    return;
}

# ---------------------------------------------------------------- helpers

sub _slurp {
    my ($path) = @_;
    open my $fh, '<', $path or return '';
    local $/;
    my $text = <$fh>;
    close $fh;
    return $text;
}

sub _spew {
    my ($path, $text) = @_;
    open my $fh, '>', $path or die "cannot write $path: $!\n";
    print {$fh} $text;
    close $fh or die "cannot write $path: $!\n";
    return;
}

sub _free_port {
    my $sock = IO::Socket::INET->new(
        LocalAddr => '127.0.0.1',
        LocalPort => 0,
        Proto     => 'tcp',
        Listen    => 1,
        ReuseAddr => 1,
    ) or die "cannot find a free port: $!\n";
    my $port = $sock->sockport;
    close $sock;
    return $port;
}

sub _nginx_version {
    my $out = `$NginxBin -v 2>&1`;
    return $out =~ m{nginx/(\d+)\.(\d+)\.(\d+)} ? ($1 * 1_000_000 + $2 * 1000 + $3) : 0;
}

sub _version_num {
    my ($v) = @_;
    my @p = split /\./, $v;
    return ($p[0] || 0) * 1_000_000 + ($p[1] || 0) * 1000 + ($p[2] || 0);
}

# Block value as a string (undef when absent); `eval` filters may make refs.
sub _val {
    my ($block, $name) = @_;
    return undef unless exists $block->{$name};
    my $v = $block->$name;
    return $v;
}

# Lines of a section as patterns: plain lines are substrings; an `eval`
# section may give a qr// or an array of strings and qr//s.
sub _patterns {
    my ($v) = @_;
    return () unless defined $v;
    return ($v) if ref $v eq 'Regexp';
    return @$v if ref $v eq 'ARRAY';
    return grep { length } map { s/^\s+|\s+$//gr } split /\n/, $v;
}

# $TEST_NGINX_* in config and requests.
sub _vars {
    my %v = map { $_ => $ENV{$_} } grep { /^TEST_NGINX_/ } keys %ENV;
    $v{TEST_NGINX_SERVER_PORT} = $Port;
    $v{TEST_NGINX_REPO} = $Repo;
    $v{TEST_NGINX_SERVROOT} = $Servroot;
    $v{TEST_NGINX_LIB_DIR} = $CpathDir;
    $v{TEST_NGINX_WORKERS} = $Workers;
    $v{"TEST_NGINX_PORT_$_"} = $ExtraPorts[$_ - 1] for 1 .. @ExtraPorts;
    return \%v;
}

sub _expand {
    my ($text, $vars) = @_;
    return $text unless defined $text && !ref $text;
    $text =~ s{\$(TEST_NGINX_[A-Z0-9_]+)}{
        exists $vars->{$1} ? $vars->{$1} : die "unknown variable \$$1\n"
    }ge;
    return $text;
}

# ---------------------------------------------------------------- config

sub _config_text {
    my ($block, $vars) = @_;
    if (defined(my $whole = _val($block, 'nginx_conf'))) {
        # The block brings the whole nginx.conf (e.g. nginx-conf/nginx.conf,
        # rewritten): it must use logs/nginx.pid and $TEST_NGINX_* ports.
        return _expand($whole, $vars);
    }
    my $main = _expand(_val($block, 'main_config') // '', $vars);
    my $http = _expand(_val($block, 'http_config') // '', $vars);
    my $server = _expand(_val($block, 'config') // '', $vars);
    my $listen_opts = _val($block, 'listen_opts') // '';
    $listen_opts =~ s/\s+\z//;
    $listen_opts = " $listen_opts" if $listen_opts ne '';
    my $user = $> == 0 ? "user root;\n" : '';
    my $title = $block->name // '';
    $title =~ s/\n.*//s;
    return <<"CONF";
# Generated by Test::LLMProxy::Nginx for $0, block ${\ $block->seq_num}: $title
load_module $ModDir/ndk_http_module.so;
load_module $ModDir/ngx_http_lua_module.so;

${user}worker_processes $Workers;
master_process on;
daemon on;
pid logs/nginx.pid;
error_log logs/error.log debug;

$main

events {
    worker_connections 1024;
}

http {
    access_log logs/access.log;
    default_type text/plain;
    keepalive_timeout 65;

    client_body_temp_path temp/client_body;
    proxy_temp_path temp/proxy;
    fastcgi_temp_path temp/fastcgi;
    uwsgi_temp_path temp/uwsgi;
    scgi_temp_path temp/scgi;

    lua_package_path "$Repo/openresty/lib/?.lua;$Repo/t/lib/?.lua;$Repo/examples/lua/?.lua;;";
    lua_package_cpath "$CpathDir/lib?.so;;";

$http

    server {
        listen 127.0.0.1:$Port$listen_opts;
        server_name localhost;
        client_max_body_size 30m;

$server
    }
}
CONF
}

# ---------------------------------------------------------------- processes

sub _alive {
    my ($pid) = @_;
    return 0 unless $pid && kill 0, $pid;
    my $stat = _slurp("/proc/$pid/stat");
    return 1 unless $stat;    # no procfs: trust kill 0
    my ($state) = $stat =~ /\)\s+(\S)/;
    return !($state && ($state eq 'Z' || $state eq 'X'));
}

# Live child processes of the master (its workers), from /proc.
sub _children {
    my ($ppid) = @_;
    my @kids;
    opendir my $dh, '/proc' or return ();
    for my $pid (grep { /^\d+$/ } readdir $dh) {
        my $stat = _slurp("/proc/$pid/stat") or next;
        my ($state, $parent) = $stat =~ /\)\s+(\S)\s+(\d+)/ or next;
        push @kids, $pid if $parent == $ppid && $state ne 'Z' && $state ne 'X';
    }
    closedir $dh;
    return sort { $a <=> $b } @kids;
}

sub _log_path { return "$Servroot/logs/error.log" }

sub _log_size { return -s _log_path() || 0 }

sub _log_since {
    my ($offset) = @_;
    open my $fh, '<', _log_path() or return '';
    seek $fh, $offset, 0;
    local $/;
    my $text = <$fh> // '';
    close $fh;
    return $text;
}

sub _write_config {
    my ($block) = @_;
    my $vars = _vars();
    _write_user_files($block, $vars);
    my $text = _config_text($block, $vars);
    $DebugLog = $text =~ m{^\s*error_log\s+logs/error\.log\s+debug\s*;}m ? 1 : 0;
    _spew("$Servroot/conf/nginx.conf", $text);
    return;
}

# --- user_files: ">>> relative/name" lines start files under html/.
sub _write_user_files {
    my ($block, $vars) = @_;
    my $text = _val($block, 'user_files');
    return unless defined $text;
    my @parts = split /^>>>[ \t]*(\S+)[ \t]*\n/m, $text;
    shift @parts;    # text before the first >>>
    while (my ($file, $content) = splice @parts, 0, 2) {
        die "--- user_files: bad name '$file'\n" if $file =~ m{(?:^|/)\.\.(?:/|$)} || $file =~ m{^/};
        my $path = "$Servroot/html/$file";
        make_path(dirname($path));
        _spew($path, _expand($content // '', $vars));
    }
    return;
}

sub _prepare_servroot {
    $Servroot = File::Spec->catdir($Repo, 't', "servroot-$$");
    remove_tree($Servroot) if -d $Servroot;
    make_path(map { "$Servroot/$_" } qw(conf logs html temp lib));
    # nginx maps libllmproxy.so for its whole life; a rebuild that rewrites
    # the file in place under a running nginx crashes it (docs/architecture.md, "LuaJIT, as embedded here"). So
    # each test file loads its own copy, taken once, by an atomic rename.
    $CpathDir = "$Servroot/lib";
    if (-f llmproxy_lib()) {
        copy(llmproxy_lib(), "$CpathDir/.libllmproxy.so.tmp")
            or die "cannot copy " . llmproxy_lib() . ": $!\n";
        rename "$CpathDir/.libllmproxy.so.tmp", "$CpathDir/libllmproxy.so"
            or die "cannot rename into $CpathDir: $!\n";
    }
    $Port = _free_port();
    my %seen = ($Port => 1);
    while (@ExtraPorts < 3) {
        my $p = _free_port();
        push @ExtraPorts, $p unless $seen{$p}++;
    }
    return;
}

# Wait until `$cond->()` is true or `$secs` pass; returns the last value.
sub _wait_for {
    my ($secs, $cond) = @_;
    my $deadline = time + $secs;
    while (1) {
        my $v = $cond->();
        return $v if $v || time > $deadline;
        sleep 0.01;
    }
}

sub _port_open {
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $Port, Proto => 'tcp', Timeout => 1);
    return 0 unless $s;
    close $s;
    return 1;
}

# A worker logs "worker cycle" (debug level) once its init_worker handlers
# have run and it enters its event loop: wait for that from every worker, so
# a block's request never races a worker's init_worker_by_lua. Without a
# debug log there is no such line; the port being open has to do.
sub _await_worker_loops {
    my ($offset) = @_;
    return 1 unless $DebugLog;
    my @kids = _children($MasterPid);
    return _wait_for(10, sub {
        my $log = _log_since($offset);
        !grep { $log !~ /\] $_#\d+: worker cycle/ } @kids;
    });
}

sub _start {
    my ($offset) = @_;
    my $pidfile = "$Servroot/logs/nginx.pid";
    unlink $pidfile;
    my $out = `$NginxBin -p $Servroot/ -c conf/nginx.conf 2>&1`;
    my $rc = $? >> 8;
    if ($rc != 0) {
        return "nginx failed to start (exit $rc): $out";
    }
    my $pid = _wait_for(10, sub { my $p = _slurp($pidfile); $p =~ /(\d+)/ ? $1 : 0 });
    return "nginx did not write $pidfile: $out" unless $pid;
    $MasterPid = $pid;
    $StartedBy = $$;
    my $ready = _wait_for(10, sub { my @kids = _children($MasterPid); @kids >= $Workers && _port_open() });
    return "nginx started but is not ready on port $Port" unless $ready;
    return "nginx workers did not finish init_worker within 10 s" unless _await_worker_loops($offset);
    return undef;
}

# Reload: HUP the master, then wait until every worker is new and the old
# ones have exited; a config the master rejects shows up as [emerg].
sub _reload {
    my ($offset) = @_;
    return "nginx master $MasterPid is gone" unless _alive($MasterPid);
    my %old = map { $_ => 1 } _children($MasterPid);
    kill 'HUP', $MasterPid or return "cannot signal nginx master $MasterPid: $!";
    my $err;
    my $ok = _wait_for(10, sub {
        my $log = _log_since($offset);
        if ($log =~ /^(.*\[emerg\].*)$/m) {
            $err = "nginx rejected the new config: $1";
            return 1;
        }
        my @kids = _children($MasterPid);
        return @kids == $Workers && !grep { $old{$_} } @kids;
    });
    return $err if $err;
    return "nginx did not replace its workers within 10 s" unless $ok;
    return "nginx workers did not finish init_worker within 10 s" unless _await_worker_loops($offset);
    return undef;
}

sub _stop {
    return unless $MasterPid && $StartedBy && $StartedBy == $$;
    my $pid = $MasterPid;
    undef $MasterPid;
    return unless _alive($pid);
    kill 'QUIT', $pid;
    return if _wait_for(5, sub { !_alive($pid) });
    kill 'TERM', $pid;
    return if _wait_for(3, sub { !_alive($pid) });
    kill 'KILL', $pid;
    # Workers of a killed master.
    kill 'KILL', $_ for _children($pid);
    return;
}

END {
    my $status = $?;
    _stop();
    if ($Servroot && -d $Servroot && !$ENV{TEST_NGINX_KEEP_SERVROOT}) {
        my $tb = Test::More->builder;
        remove_tree($Servroot) if $tb->is_passing && $status == 0;
    }
    $? = $status;
}

my %SigNum = (HUP => 1, INT => 2, TERM => 15);
for my $sig (keys %SigNum) {
    $SIG{$sig} = sub { _stop(); exit 128 + $SigNum{$sig} };
}

# ---------------------------------------------------------------- client

sub _parse_request {
    my ($text) = @_;
    die "--- request is empty\n" unless defined $text && $text =~ /\S/;
    $text =~ s/\A\s+//;
    my ($first, $body) = split /\n/, $text, 2;
    $first =~ s/\s+\z//;
    my ($method, $uri, $proto) = split /\s+/, $first;
    die "--- request: expected 'METHOD /uri', got '$first'\n" unless defined $uri;
    $proto //= 'HTTP/1.1';
    if (defined $body) {
        $body =~ s/\n\z//;    # the block's own line end is not part of the body
    }
    return ($method, $uri, $proto, $body);
}

sub _send_request {
    my (%a) = @_;
    my ($method, $uri, $proto, $body) = @a{qw(method uri proto body)};
    my @headers = @{ $a{headers} || [] };
    my %have = map { lc((split /:/, $_, 2)[0]) => 1 } @headers;
    my $req = "$method $uri $proto\r\n";
    $req .= "Host: localhost\r\n" unless $have{host};
    $req .= "Connection: close\r\n" unless $have{connection};
    $req .= "$_\r\n" for @headers;
    if (defined $body && !$have{'content-length'} && !$have{'transfer-encoding'}) {
        $req .= 'Content-Length: ' . length($body) . "\r\n";
    }
    elsif (!defined $body && $method =~ /^(POST|PUT|PATCH)$/ && !$have{'content-length'}) {
        $req .= "Content-Length: 0\r\n";
    }
    $req .= "\r\n";
    $req .= $body if defined $body;

    my $sock = IO::Socket::INET->new(
        PeerAddr => '127.0.0.1', PeerPort => $Port, Proto => 'tcp', Timeout => $a{timeout},
    ) or return { error => "cannot connect to 127.0.0.1:$Port: $!" };
    binmode $sock;
    my $deadline = time + $a{timeout};
    my $sel = IO::Select->new($sock);
    my $off = 0;
    while ($off < length $req) {
        return { error => 'timeout sending the request' } unless $sel->can_write($deadline - time);
        my $n = syswrite $sock, $req, length($req) - $off, $off;
        return { error => "send failed: $!" } unless defined $n;
        $off += $n;
    }
    my $raw = '';
    while (1) {
        my $left = $deadline - time;
        if ($left <= 0 || !$sel->can_read($left)) {
            close $sock;
            return { error => "timeout reading the response after $a{timeout} s", raw => $raw };
        }
        my $n = sysread $sock, $raw, 65536, length $raw;
        last if !$n;    # EOF (or reset): nginx has finished the request
    }
    close $sock;
    return _parse_response($raw);
}

sub _parse_response {
    my ($raw) = @_;
    my $end = index $raw, "\r\n\r\n";
    return { error => 'no complete response head', raw => $raw } if $end < 0;
    my $head = substr $raw, 0, $end;
    my $body = substr $raw, $end + 4;
    my ($status_line, @lines) = split /\r\n/, $head;
    my ($status) = $status_line =~ m{^HTTP/\d\.\d\s+(\d{3})}
        or return { error => "bad status line: $status_line", raw => $raw };
    my %headers;
    for my $l (@lines) {
        my ($k, $v) = $l =~ /^([^:]+):\s*(.*)$/ or next;
        push @{ $headers{ lc $k } }, $v;
    }
    if (($headers{'transfer-encoding'}[0] // '') =~ /chunked/i) {
        my $decoded = '';
        while ($body =~ s/\A([0-9a-fA-F]+)[^\r\n]*\r\n//) {
            my $len = hex $1;
            last if $len == 0;
            $decoded .= substr $body, 0, $len, '';
            $body =~ s/\A\r\n//;
        }
        $body = $decoded;
    }
    return { status => $status, headers => \%headers, body => $body, raw => $raw };
}

# ---------------------------------------------------------------- checks

# The block's requests: one, or several from `--- request eval` [...].
sub _requests {
    my ($block) = @_;
    my $r = _val($block, 'request');
    return ref $r eq 'ARRAY' ? @$r : ($r);
}

# A per-request expectation: the i-th element of an array, or the value.
sub _nth {
    my ($v, $i) = @_;
    return ref $v eq 'ARRAY' ? $v->[$i] : $v;
}

sub _header_lines {
    my ($block, $vars) = @_;
    my $text = _val($block, 'response_headers') // '';
    $text = _expand($text, $vars) if $vars;
    return grep { /\S/ } split /\n/, $text;
}

# Checks of one request: status, body, body_like, one per header line.
sub _per_request_checks {
    my ($block) = @_;
    my $per = 1;
    $per++ if exists $block->{response_body};
    $per++ if exists $block->{response_body_like};
    $per += _header_lines($block);
    return $per;
}

sub _count_checks {
    my ($block) = @_;
    my $per = _per_request_checks($block);
    my @want = _patterns(_val($block, 'error_log'));
    my @not = _patterns(_val($block, 'no_error_log'));
    my @reqs = _requests($block);
    return $per * @reqs + @want + @not;
}

sub _skip_reason {
    my ($block, $version) = @_;
    my $cond = _val($block, 'skip_nginx');
    return undef unless defined $cond;
    $cond =~ s/^\s+|\s+$//g;
    my ($op, $v, $why) = $cond =~ /^(<=|>=|<|>|==|!=)\s*([\d.]+)\s*(.*)$/
        or die "--- skip_nginx: expected e.g. '< 1.23.0 reason', got '$cond'\n";
    my $want = _version_num($v);
    my %cmp = (
        '<' => $version < $want, '<=' => $version <= $want, '>' => $version > $want,
        '>=' => $version >= $want, '==' => $version == $want, '!=' => $version != $want,
    );
    return $cmp{$op} ? "nginx $op $v" . ($why ? ": $why" : '') : undef;
}

# Wait for the log to stop growing (the request's last lines are written).
sub _settle_log {
    my $last = -1;
    my $stable = 0;
    my $deadline = time + 1;
    while (time < $deadline) {
        my $size = _log_size();
        $stable = $size == $last ? $stable + 1 : 0;
        return if $stable >= 3;
        $last = $size;
        sleep 0.01;
    }
    return;
}

sub _fail_block {
    my ($block, $n, $why) = @_;
    my $name = $block->name;
    fail("$name - $why") for 1 .. $n;
    return;
}

sub _check_response {
    my ($block, $name, $res, $i, $vars) = @_;
    my $want_status = _nth(_val($block, 'error_code'), $i) // 200;
    $want_status =~ s/\s+//g;
    is($res->{status}, $want_status, "$name - status code ok");

    if (exists $block->{response_body}) {
        my $want = _nth(_val($block, 'response_body'), $i) // '';
        if (ref $want eq 'Regexp') {
            like($res->{body}, $want, "$name - response_body - response is expected");
        }
        else {
            is($res->{body}, _expand($want, $vars), "$name - response_body - response is expected");
        }
    }
    if (exists $block->{response_body_like}) {
        my $pat = _nth(_val($block, 'response_body_like'), $i);
        $pat = _expand($pat, $vars) unless ref $pat;
        $pat =~ s/\n\z// unless ref $pat;
        my $re = ref $pat eq 'Regexp' ? $pat : qr/$pat/s;
        like($res->{body}, $re, "$name - response_body_like - response is expected");
    }
    if (defined(my $pat = _val($block, 'diag_body'))) {
        # Lines of the body worth seeing in the TAP output (e.g. a summary).
        $pat =~ s/\n\z// unless ref $pat;
        my $re = ref $pat eq 'Regexp' ? $pat : qr/$pat/;
        diag("$name: $_") for grep { $_ =~ $re } split /\n/, $res->{body} // '';
    }
    for my $line (_header_lines($block, $vars)) {
        $line =~ s/^\s+|\s+$//g;
        if ($line =~ /^!\s*(.+)$/) {
            my $h = $1;
            ok(!exists $res->{headers}{ lc $h }, "$name - header $h absent")
                or diag("got $h: " . join(', ', @{ $res->{headers}{ lc $h } }));
            next;
        }
        my ($h, $v) = $line =~ /^([^:]+):\s*(.*)$/
            or die "--- response_headers: expected 'Name: value' or '!Name', got '$line'\n";
        my $got = exists $res->{headers}{ lc $h } ? join(', ', @{ $res->{headers}{ lc $h } }) : undef;
        is($got, $v, "$name - header $h ok");
    }
    return;
}

# known_sections(NAME...): sections a helper or test file reads itself.
sub known_sections {
    $Known{$_} = 1 for @_;
    return;
}

sub _run_block {
    my ($block, $version) = @_;
    my $name = $block->name;
    # Test::Base keeps the sections as written, in order, as [[names]].
    for my $section (map { @$_ } @{ $block->{_section_order} || [] }) {
        die "$name: --- $section is not a section this harness knows (t/lib/Test/LLMProxy/Nginx.pm)\n"
            unless $Known{$section};
    }
    my $n = _count_checks($block);

    if (my $why = _skip_reason($block, $version)) {
        SKIP: { skip("$name: $why", $n) }
        return;
    }

    my $offset = _log_size();
    _write_config($block);
    my $t0 = time;
    my $how = 'reloaded';
    my $err;
    if (!$MasterPid || !_alive($MasterPid)) {
        $how = 'started';
        $err = _start($offset);
    }
    elsif ($Reload) {
        $err = _reload($offset);
    }
    else {
        $how = 'restarted';
        _stop();
        $offset = _log_size();
        $err = _start($offset);
    }
    diag(sprintf('%s: nginx %s in %.3f s', $name, $how, time - $t0)) if $ENV{TEST_NGINX_VERBOSE};
    if ($err) {
        diag($err);
        diag(_log_since($offset) =~ s/^(?!.*\[(?:emerg|alert|crit|error)\]).*\n?//mgr);
        _fail_block($block, $n, 'nginx not ready');
        return;
    }

    my $vars = _vars();
    my $timeout = _val($block, 'timeout') // $DefaultTimeout;
    $timeout =~ s/\s+//g;
    my @more = grep { /\S/ } split /\n/, (_expand(_val($block, 'more_headers'), $vars) // '');
    my @reqs = _requests($block);
    for my $i (0 .. $#reqs) {
        my $label = @reqs > 1 ? "$name (request " . ($i + 1) . ')' : $name;
        my ($method, $uri, $proto, $body) = _parse_request(_expand($reqs[$i], $vars));
        my $res = _send_request(
            method => $method, uri => $uri, proto => $proto, body => $body,
            headers => \@more, timeout => $timeout,
        );
        if ($res->{error}) {
            diag("$label: $res->{error}");
            fail("$label - no response") for 1 .. _per_request_checks($block);
            diag(_log_since($offset) =~ s/^(?!.*\[(?:emerg|alert|crit|error)\]).*\n?//mgr);
            next;
        }
        _check_response($block, $label, $res, $i, $vars);
    }
    if (defined _val($block, 'stop_after')) {
        # A graceful stop (QUIT) right after the last response, waited for:
        # what the workers do on their way out (and the log lines it leaves)
        # is checked below; the next block starts a fresh nginx.
        _stop();
    }
    my @want_log = _patterns(_val($block, 'error_log'));
    my @no_log = _patterns(_val($block, 'no_error_log'));
    return unless @want_log || @no_log;

    if (my $wait = _val($block, 'wait')) {
        $wait =~ s/\s+//g;
        sleep $wait;
    }
    _settle_log();
    my $matches = sub {
        my ($log, $p) = @_;
        return ref $p eq 'Regexp' ? $log =~ $p : index($log, $p) >= 0;
    };
    my $log = _log_since($offset);
    if (grep { !$matches->($log, $_) } @want_log) {
        # Lines written after the response (log phase, timers): poll a while.
        _wait_for($timeout, sub {
            $log = _log_since($offset);
            !grep { !$matches->($log, $_) } @want_log;
        });
    }
    for my $p (@want_log) {
        ok($matches->($log, $p), "$name - error_log has: $p");
    }
    for my $p (@no_log) {
        ok(!$matches->($log, $p), "$name - error_log has no: $p")
            or diag(join "\n", grep { $matches->($_, $p) } split /\n/, $log);
    }
    return;
}

# ---------------------------------------------------------------- entry

sub run_tests {
    my @blocks = blocks();
    for my $pre (@Preprocessors) {
        $pre->($_) for @blocks;
    }
    if (!-x $NginxBin && !`command -v $NginxBin 2>/dev/null`) {
        plan skip_all => "nginx not found (set TEST_NGINX_BINARY)";
    }
    for my $mod (qw(ndk_http_module ngx_http_lua_module)) {
        plan skip_all => "$ModDir/$mod.so missing (apt-get install libnginx-mod-http-lua)"
            unless -f "$ModDir/$mod.so";
    }
    for my $b (@blocks) {
        die "block '" . ($b->name // '?') . "' has no --- request\n" unless exists $b->{request};
    }
    my $total = 0;
    $total += _count_checks($_) for @blocks;
    plan tests => $total;

    _prepare_servroot();
    my $version = _nginx_version();
    _run_block($_, $version) for @blocks;
    _stop();
    return;
}

1;
