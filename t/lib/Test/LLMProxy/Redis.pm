package Test::LLMProxy::Redis;

# A private redis-server for one test file: on a free 127.0.0.1 port, no
# persistence, stopped when the file ends. Sets $ENV{TEST_NGINX_REDIS_PORT}
# so blocks can say `url: redis://127.0.0.1:$TEST_NGINX_REDIS_PORT`.
#
#   use Test::LLMProxy::Redis;
#   my $port = start_redis();   # dies when redis-server is missing or mute
#   redis_cli('HGET', 'llmproxy:q:fp', 'used');

use strict;
use warnings;
use IO::Socket::INET;
use Time::HiRes qw(sleep);

my @EXPORTS = qw(start_redis redis_cli);
my ($Pid, $Port);

sub import {
    my $caller = caller;
    no strict 'refs';
    *{"${caller}::$_"} = \&{$_} for @EXPORTS;
    return;
}

sub _free_port {
    my $sock = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Proto => 'tcp', Listen => 1)
        or die "cannot find a free port: $!\n";
    my $port = $sock->sockport;
    close $sock;
    return $port;
}

sub start_redis {
    $Port = _free_port();
    $Pid = fork // die "fork: $!\n";
    if ($Pid == 0) {
        open STDOUT, '>', '/dev/null';
        exec 'redis-server', '--port', $Port, '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'
            or die "cannot run redis-server (make test-openresty installs it): $!\n";
    }
    for (1 .. 100) {
        if (IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $Port, Proto => 'tcp')) {
            $ENV{TEST_NGINX_REDIS_PORT} = $Port;
            return $Port;
        }
        sleep 0.05;
    }
    die "redis-server did not answer on 127.0.0.1:$Port within 5 s\n";
}

sub redis_cli {
    my @args = @_;
    open my $fh, '-|', 'redis-cli', '-p', $Port, @args or die "redis-cli: $!\n";
    local $/;
    my $out = <$fh>;
    close $fh;
    $out =~ s/\s+\z// if defined $out;
    return $out;
}

END {
    if ($Pid) {
        kill 'TERM', $Pid;
        waitpid $Pid, 0;
    }
}

1;
