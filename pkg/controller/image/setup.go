package image

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"vimg.dev/vimg/dvcr/layout"
	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
)

// indexObjectRef indexes images by the image they copy ("vi/ns/name" or
// "cvi/name"), so that a source becoming Ready wakes its copies.
const indexObjectRef = "vimg.dev/objectRef"

func objectRefKey(kind v1.ObjectRefKind, ns, name string) string {
	if kind == v1.ObjectRefKindClusterVirtualImage {
		return layout.KindClusterVirtualImage + "/" + name
	}
	return string(kind) + "/" + ns + "/" + name
}

func refIndexer(o client.Object) []string {
	var obj object
	switch t := o.(type) {
	case *v1.VirtualImage:
		obj = virtualImage{t}
	case *v1.ClusterVirtualImage:
		obj = clusterVirtualImage{t}
	default:
		return nil
	}
	if r := obj.source().Ref; r != nil {
		return []string{objectRefKey(r.Kind, r.Namespace, r.Name)}
	}
	return nil
}

// SetupWithManager registers both image controllers, the index they share
// and their watches: the images themselves, their import pods (in the
// controller's namespace, found by label), their upload Secrets, and the
// images they copy.
func SetupWithManager(mgr ctrl.Manager, vi, cvi *Reconciler) error {
	idx := mgr.GetFieldIndexer()
	if err := idx.IndexField(context.Background(), &v1.VirtualImage{}, indexObjectRef, refIndexer); err != nil {
		return err
	}
	if err := idx.IndexField(context.Background(), &v1.ClusterVirtualImage{}, indexObjectRef, refIndexer); err != nil {
		return err
	}
	ns := vi.cfg.Namespace
	importPods := predicate.NewPredicateFuncs(func(o client.Object) bool {
		return o.GetNamespace() == ns && o.GetLabels()[LabelComponent] == componentImporter
	})
	uploads := predicate.NewPredicateFuncs(func(o client.Object) bool {
		return o.GetNamespace() == vi.cfg.UploadNamespace && o.GetLabels()[LabelComponent] == componentUpload
	})
	// Import pods and upload Secrets carry the labels of their image.
	toImage := func(kind string) handler.EventHandler {
		return handler.EnqueueRequestsFromMapFunc(func(_ context.Context, o client.Object) []reconcile.Request {
			l := o.GetLabels()
			if l[LabelImageKind] != kind {
				return nil
			}
			return []reconcile.Request{{NamespacedName: types.NamespacedName{Namespace: l[LabelImageNamespace], Name: l[LabelImageName]}}}
		})
	}
	// A change of an image wakes the images that copy it.
	dependents := func(list func() client.ObjectList, kind v1.ObjectRefKind) handler.EventHandler {
		return handler.EnqueueRequestsFromMapFunc(func(c context.Context, o client.Object) []reconcile.Request {
			l := list()
			if err := mgr.GetClient().List(c, l, client.MatchingFields{indexObjectRef: objectRefKey(kind, o.GetNamespace(), o.GetName())}); err != nil {
				return nil
			}
			var out []reconcile.Request
			items, _ := meta.ExtractList(l)
			for _, it := range items {
				m, err := meta.Accessor(it)
				if err != nil {
					continue
				}
				out = append(out, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: m.GetNamespace(), Name: m.GetName()}})
			}
			return out
		})
	}
	viList := func() client.ObjectList { return &v1.VirtualImageList{} }
	cviList := func() client.ObjectList { return &v1.ClusterVirtualImageList{} }
	if err := ctrl.NewControllerManagedBy(mgr).Named("virtualimage").
		For(&v1.VirtualImage{}).
		Watches(&corev1.Pod{}, toImage(layout.KindVirtualImage), builder.WithPredicates(importPods)).
		Watches(&corev1.Secret{}, toImage(layout.KindVirtualImage), builder.WithPredicates(uploads)).
		Watches(&v1.VirtualImage{}, dependents(viList, v1.ObjectRefKindVirtualImage)).
		Watches(&v1.ClusterVirtualImage{}, dependents(viList, v1.ObjectRefKindClusterVirtualImage)).
		// Images stored in claims: their claims, and a class appearing.
		Owns(&corev1.PersistentVolumeClaim{}).
		Watches(&storagev1.StorageClass{}, handler.EnqueueRequestsFromMapFunc(func(c context.Context, _ client.Object) []reconcile.Request {
			var l v1.VirtualImageList
			if err := mgr.GetClient().List(c, &l); err != nil {
				return nil
			}
			var out []reconcile.Request
			for _, it := range l.Items {
				if it.Spec.Storage == v1.StoragePersistentVolumeClaim && it.Status.Phase != v1.ImagePhaseReady {
					out = append(out, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(&it)})
				}
			}
			return out
		})).
		Complete(vi); err != nil {
		return err
	}
	return ctrl.NewControllerManagedBy(mgr).Named("clustervirtualimage").
		For(&v1.ClusterVirtualImage{}).
		Watches(&corev1.Pod{}, toImage(layout.KindClusterVirtualImage), builder.WithPredicates(importPods)).
		Watches(&corev1.Secret{}, toImage(layout.KindClusterVirtualImage), builder.WithPredicates(uploads)).
		Watches(&v1.VirtualImage{}, dependents(cviList, v1.ObjectRefKindVirtualImage)).
		Watches(&v1.ClusterVirtualImage{}, dependents(cviList, v1.ObjectRefKindClusterVirtualImage)).
		Complete(cvi)
}
