package populator

import (
	"context"
	"errors"
	"fmt"
	"time"

	populatormachinery "github.com/kubernetes-csi/lib-volume-populator/v3/populator-machinery"
	"golang.org/x/time/rate"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/dynamic/dynamiclister"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
)

// Run populates claims until ctx ends. kubeconfig is "" in a pod.
func Run(ctx context.Context, cfg Config, rc *rest.Config, kubeconfig string) error {
	cfg.setDefaults()
	if cfg.Registry == nil || cfg.WorkerImage == "" || cfg.DVCRAddress == "" {
		return errors.New("populator: Registry, WorkerImage and DVCRAddress are required")
	}
	kube, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return err
	}
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: kube.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	recorder := broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "vimg-populator"})

	// Pods of the populator's namespace only; claims everywhere (user
	// claims and prime claims); images of both kinds.
	podFactory := informers.NewSharedInformerFactoryWithOptions(kube, 0, informers.WithNamespace(cfg.Namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = LabelComponent + "=" + componentPopulate }))
	// Serve pods, in the namespaces of the images they serve.
	serveFactory := informers.NewSharedInformerFactoryWithOptions(kube, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = LabelComponent + "=" + componentServe }))
	factory := informers.NewSharedInformerFactory(kube, 0)
	dynFactory := dynamicinformer.NewDynamicSharedInformerFactory(dyn, 0)
	pods := podFactory.Core().V1().Pods()
	servePods := serveFactory.Core().V1().Pods()
	pvcs := factory.Core().V1().PersistentVolumeClaims()
	scs := factory.Storage().V1().StorageClasses()
	vis := dynFactory.ForResource(VirtualImageGVR)
	cvis := dynFactory.ForResource(ClusterVirtualImageGVR)
	if err := pvcs.Informer().AddIndexers(cache.Indexers{byImage: claimImageIndex, byUID: uidIndex}); err != nil {
		return err
	}

	w := &worker{cfg: cfg, kube: kube, pods: pods.Lister(), servePods: servePods.Lister(), recorder: recorder, said: map[types.UID]string{}}
	c := &claims{w: w, pvcs: pvcs.Lister(), scs: scs.Lister(),
		vis: dynamiclister.New(vis.Informer().GetIndexer(), VirtualImageGVR), cvis: dynamiclister.New(cvis.Informer().GetIndexer(), ClusterVirtualImageGVR)}
	c.byUID = claimsByUID(pvcs.Informer().GetIndexer())
	w.lookup = c.image
	parked := func(key string) bool {
		ns, name, ok := claimKey(key)
		if !ok {
			return false
		}
		pvc, err := c.pvcs.PersistentVolumeClaims(ns).Get(name)
		if err != nil {
			return false
		}
		prime, err := c.prime(pvc)
		return err == nil && prime != nil && prime.Annotations[AnnotationFailed] != ""
	}
	libQueue := newQueue("vimg-populator-virtualimage", cfg.MaxRetryDelay, parked)
	ownQueue := newQueue("vimg-populator-claims", cfg.MaxRetryDelay, parked)
	enqueue := func(ns, name string) {
		key := "pvc/" + ns + "/" + name
		libQueue.Add(key)
		ownQueue.Add(key)
	}

	handlers := func(fn func(obj any)) cache.ResourceEventHandlerFuncs {
		return cache.ResourceEventHandlerFuncs{AddFunc: fn, UpdateFunc: func(_, n any) { fn(n) }, DeleteFunc: fn}
	}
	podHandler := handlers(func(obj any) {
		if p := objectOf(obj); p != nil {
			if ns, name := claimOf(p); name != "" {
				enqueue(ns, name)
			}
		}
	})
	if _, err := pods.Informer().AddEventHandler(podHandler); err != nil {
		return err
	}
	if _, err := servePods.Informer().AddEventHandler(podHandler); err != nil {
		return err
	}
	if _, err := pvcs.Informer().AddEventHandler(handlers(func(obj any) {
		p := objectOf(obj)
		switch {
		case p == nil:
		case p.GetNamespace() == cfg.Namespace:
			// A prime claim made by cluster.go carries its claim's name.
			if ns, name := claimOf(p); name != "" {
				ownQueue.Add("pvc/" + ns + "/" + name)
			}
		default:
			ownQueue.Add("pvc/" + p.GetNamespace() + "/" + p.GetName())
			// A clone claim moves its user's claim on.
			if ns, name := claimOf(p); name != "" && p.GetLabels()[LabelComponent] == componentClone {
				ownQueue.Add("pvc/" + ns + "/" + name)
			}
		}
	})); err != nil {
		return err
	}
	imageHandler := func(kind string) func(obj any) {
		return func(obj any) {
			o := objectOf(obj)
			if o == nil {
				return
			}
			claims, _ := pvcs.Informer().GetIndexer().ByIndex(byImage, kind+"/"+o.GetNamespace()+"/"+o.GetName())
			for _, x := range claims {
				p := x.(*corev1.PersistentVolumeClaim)
				enqueue(p.Namespace, p.Name)
			}
		}
	}
	if _, err := vis.Informer().AddEventHandler(handlers(imageHandler(VirtualImageGK.Kind))); err != nil {
		return err
	}
	if _, err := cvis.Informer().AddEventHandler(handlers(imageHandler(ClusterVirtualImageGK.Kind))); err != nil {
		return err
	}

	podFactory.Start(ctx.Done())
	serveFactory.Start(ctx.Done())
	factory.Start(ctx.Done())
	dynFactory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), pods.Informer().HasSynced, servePods.Informer().HasSynced, pvcs.Informer().HasSynced, scs.Informer().HasSynced,
		vis.Informer().HasSynced, cvis.Informer().HasSynced) {
		return fmt.Errorf("populator: informers did not sync: %w", context.Cause(ctx))
	}

	// lib-volume-populator handles VirtualImage claims. It stops on
	// SIGTERM by itself; the process exits with ctx.
	go populatormachinery.RunControllerWithConfig(populatormachinery.VolumePopulatorConfig{
		Kubeconfig: kubeconfig,
		Namespace:  cfg.Namespace,
		Prefix:     Prefix,
		Gk:         VirtualImageGK,
		Gvr:        VirtualImageGVR,
		ProviderFunctionConfig: &populatormachinery.ProviderFunctionConfig{
			PopulateFn: func(ctx context.Context, p populatormachinery.PopulatorParams) error {
				return w.populate(ctx, p.Pvc, p.PvcPrime, p.Unstructured)
			},
			PopulateCompleteFn: func(ctx context.Context, p populatormachinery.PopulatorParams) (bool, error) {
				return w.complete(ctx, p.Pvc, p.PvcPrime)
			},
			PopulateCleanupFn: func(ctx context.Context, p populatormachinery.PopulatorParams) error {
				if err := c.removeClone(ctx, p.Pvc); err != nil {
					return err
				}
				return w.cleanup(ctx, p.Pvc)
			},
		},
		MutatorConfig: &populatormachinery.MutatorConfig{
			PvcPrimeMutator: func(p populatormachinery.PvcPrimeMutatorParams) (*corev1.PersistentVolumeClaim, error) {
				return c.mutatePrime(p.PvcPrime)
			},
		},
		Workqueue: libQueue,
		Recorder:  recorder,
	})

	klog.FromContext(ctx).Info("Populator running", "namespace", cfg.Namespace, "dvcr", cfg.DVCRAddress)
	go wait.UntilWithContext(ctx, func(ctx context.Context) {
		for processNext(ctx, ownQueue, c) {
		}
	}, time.Second)
	<-ctx.Done()
	ownQueue.ShutDown()
	return nil
}

func processNext(ctx context.Context, q workqueue.TypedRateLimitingInterface[any], c *claims) bool {
	item, shutdown := q.Get()
	if shutdown {
		return false
	}
	defer q.Done(item)
	key, _ := item.(string)
	ns, name, ok := claimKey(key)
	if !ok {
		q.Forget(item)
		return true
	}
	err := c.sync(ctx, ns, name)
	switch {
	case err == nil:
		q.Forget(item)
	case errors.Is(err, errNotDone):
		q.AddRateLimited(item)
	default:
		utilruntime.HandleErrorWithContext(ctx, err, "Syncing claim failed; will retry", "pvc", klog.KRef(ns, name))
		q.AddRateLimited(item)
	}
	return true
}

const (
	byImage = "vimg.dev/image"
	byUID   = "vimg.dev/uid"
)

// claimsByUID finds claims by UID in an indexer with the byUID index.
func claimsByUID(idx cache.Indexer) func(uid string) ([]*corev1.PersistentVolumeClaim, error) {
	return func(uid string) ([]*corev1.PersistentVolumeClaim, error) {
		objs, err := idx.ByIndex(byUID, uid)
		out := make([]*corev1.PersistentVolumeClaim, 0, len(objs))
		for _, o := range objs {
			if p, ok := o.(*corev1.PersistentVolumeClaim); ok {
				out = append(out, p)
			}
		}
		return out, err
	}
}

func uidIndex(obj any) ([]string, error) {
	if o := objectOf(obj); o != nil {
		return []string{string(o.GetUID())}, nil
	}
	return nil, nil
}

// claimImageIndex indexes claims by the image their dataSourceRef names:
// "VirtualImage/<ns>/<name>" or "ClusterVirtualImage//<name>".
func claimImageIndex(obj any) ([]string, error) {
	pvc, ok := obj.(*corev1.PersistentVolumeClaim)
	if !ok || pvc.Spec.DataSourceRef == nil || pvc.Spec.DataSourceRef.APIGroup == nil || *pvc.Spec.DataSourceRef.APIGroup != VirtualImageGK.Group {
		return nil, nil
	}
	switch r := pvc.Spec.DataSourceRef; r.Kind {
	case VirtualImageGK.Kind:
		return []string{r.Kind + "/" + pvc.Namespace + "/" + r.Name}, nil
	case ClusterVirtualImageGK.Kind:
		return []string{r.Kind + "//" + r.Name}, nil
	}
	return nil, nil
}

func objectOf(obj any) metav1.Object {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	switch o := obj.(type) {
	case *unstructured.Unstructured:
		return o
	case metav1.Object:
		return o
	}
	return nil
}

// parkingQueue is a rate-limited queue whose backoff is capped at a sane
// delay, and which drops the backoff requeues of claims that failed for
// good: they come back only on an event (the claim or its image changed).
type parkingQueue struct {
	workqueue.TypedRateLimitingInterface[any]
	parked func(key string) bool
}

func newQueue(name string, maxDelay time.Duration, parked func(string) bool) *parkingQueue {
	rl := workqueue.NewTypedMaxOfRateLimiter(
		workqueue.NewTypedItemExponentialFailureRateLimiter[any](500*time.Millisecond, maxDelay),
		&workqueue.TypedBucketRateLimiter[any]{Limiter: rate.NewLimiter(rate.Limit(10), 100)},
	)
	return &parkingQueue{
		TypedRateLimitingInterface: workqueue.NewTypedRateLimitingQueueWithConfig(rl, workqueue.TypedRateLimitingQueueConfig[any]{Name: name}),
		parked:                     parked,
	}
}

func (q *parkingQueue) AddRateLimited(item any) {
	if key, ok := item.(string); ok && q.parked(key) {
		q.Forget(item)
		return
	}
	q.TypedRateLimitingInterface.AddRateLimited(item)
}
