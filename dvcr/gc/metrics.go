package gc

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	passes       *prometheus.CounterVec
	blobsDeleted prometheus.Counter
	bytesFreed   prometheus.Counter
	reposRemoved prometheus.Counter
	lastSuccess  prometheus.Gauge
	leaseErrors  prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		passes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "dvcr", Subsystem: "gc", Name: "passes_total",
			Help: "Garbage collection passes, by result (success or error).",
		}, []string{"result"}),
		blobsDeleted: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "dvcr", Subsystem: "gc", Name: "blobs_deleted_total",
			Help: "Blobs deleted because no manifest referenced them.",
		}),
		bytesFreed: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "dvcr", Subsystem: "gc", Name: "freed_bytes_total",
			Help: "Bytes of blob data deleted.",
		}),
		reposRemoved: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "dvcr", Subsystem: "gc", Name: "repositories_removed_total",
			Help: "Empty repositories removed.",
		}),
		lastSuccess: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "dvcr", Subsystem: "gc", Name: "last_success_timestamp_seconds",
			Help: "Unix time at which the last successful pass ended.",
		}),
		leaseErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "dvcr", Subsystem: "gc", Name: "lease_errors_total",
			Help: "Registry requests refused because their blob lease could not be recorded.",
		}),
	}
	// Pre-create both results so dashboards see zeros, not absent series.
	m.passes.WithLabelValues("success")
	m.passes.WithLabelValues("error")
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.passes, m.blobsDeleted, m.bytesFreed, m.reposRemoved, m.lastSuccess, m.leaseErrors} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("registering garbage collection metrics: %w", err)
		}
	}
	return m, nil
}
